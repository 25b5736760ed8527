"""Odd inputs are refused with a ValueError that names the problem (or, where they make
sense, accepted): never truncated, cast or reported as another library's internal error."""

import json
import os
import stat

import numpy as np
import pytest

from numpygpt import CrossEntropyLoss, GPTConfig, GPTModel, backend, no_grad
from numpygpt.checkpoint import save_checkpoint
from numpygpt.cli import main
from numpygpt.data import DataLoader, GPTDataset
from numpygpt.data import default_corpus


def tiny(**kw):
    return GPTConfig.preset("tiny", **kw)


@pytest.fixture(scope="module")
def model():
    return GPTModel(tiny(), seed=0)


def test_token_ids_as_a_list_are_accepted(model):
    with no_grad():
        from_list = model([[1, 2, 3]])
        from_array = model(np.array([[1, 2, 3]]))
    np.testing.assert_array_equal(backend.to_host(from_list), backend.to_host(from_array))


@pytest.mark.parametrize("idx, match", [
    (np.zeros((0, 4), dtype=np.int64), "empty"),
    (np.zeros((2, 0), dtype=np.int64), "empty"),
    (np.array([[1.0, 2.0]]), "integers"),
    (np.array([[True, False]]), "integers"),
])
def test_bad_token_ids_are_refused(model, idx, match):
    with pytest.raises(ValueError, match=match):
        model(idx)


@pytest.mark.parametrize("targets, match", [
    (np.array([[1.0, 2.0, 3.0]]), "integer"),
    (np.array([[True, False, True]]), "integer"),
])
def test_float_and_bool_targets_are_refused(targets, match):
    logits = np.zeros((1, 3, 5))
    with pytest.raises(ValueError, match=match):
        CrossEntropyLoss()(logits, targets)


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_length=4.5, stride=4), "max_length"),
    (dict(max_length=4, stride=2.0), "stride"),
    (dict(max_length=True, stride=4), "max_length"),
])
def test_dataset_refuses_non_integer_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GPTDataset(np.arange(100), **kwargs)


@pytest.mark.parametrize("batch_size", [2.5, 0, True])
def test_loader_refuses_non_integer_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(GPTDataset(np.arange(100), 4, 4), batch_size)


@pytest.mark.parametrize("field, value", [
    ("emb_dim", "32"), ("n_layers", 2.7), ("vocab_size", 1e9), ("n_heads", True), ("dtype", "bogus"),
    ("drop_rate", "0.1"), ("qkv_bias", "yes"),
])
def test_config_refuses_wrong_types(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


def test_from_pretrained_refuses_a_bogus_dtype(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="dtype"):
        GPTModel.from_pretrained(str(tmp_path / "m"), dtype="bogus")


def test_wrong_shape_dlogits_is_named(model):
    model.train()
    logits = model(np.array([[1, 2, 3]]))  # (1, 3, V)
    with pytest.raises(ValueError, match="dlogits has shape"):
        model.backward(np.zeros((1, 3, 7), dtype=logits.dtype))


def test_save_pretrained_writes_files_with_the_mode_of_checkpoints(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    save_checkpoint(tmp_path / "ckpt.safetensors", model)
    want = stat.S_IMODE(os.stat(tmp_path / "ckpt.safetensors").st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert want == 0o666 & ~mask
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode) == want, name


def test_resume_that_asks_for_no_more_steps_is_refused(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text(default_corpus()[:12000], encoding="utf-8")
    common = ["--device", "cpu", "--no-progress", "--prompt="]
    first = tmp_path / "first"
    assert main(["train", "--data", str(text), "--preset", "tiny", "--batch-size", "2", "--max-steps", "8",
                 "--out", str(first), *common]) == 0
    capsys.readouterr()
    code = main(["train", "--resume", str(first / "checkpoint.safetensors"), "--max-steps", "4",
                 "--out", str(tmp_path / "new"), *common])
    err = capsys.readouterr().err
    assert code == 2 and "already at step 8" in err and "--max-steps" in err
    assert not (tmp_path / "new" / "checkpoint.safetensors").exists()
