"""Fine-tuning Llama 3 and Qwen3 through the same commands as GPT-2: a classifier (its
gradients checked, with and without LoRA), `finetune classify`, `finetune instruct`, `finetune
dpo` and `chat` on tiny models saved as Hugging Face directories with their own small
tokenizer (trained here, with the chat templates' special tokens), offline, in seconds."""

import json

import numpy as np
import pytest
from tokenizers import AddedToken

import numpygpt
from numpygpt import CrossEntropyLoss, LlamaConfig, LlamaModel, apply_lora
from numpygpt.cli import main
from numpygpt.gradcheck import check_model_loss
from numpygpt.tokenizer import HFTokenizer, train_bpe
from conftest import assert_grads_ok, to_dev

FAMILIES = ["llama", "qwen3"]
FRUIT = "apple banana cherry grape lemon mango melon peach pear plum".split()
SPACE = "rocket planet galaxy comet orbit star moon nebula quasar meteor".split()
PAIRS = [("Name the color of the sky.", "Blue."), ("What is two plus three?", "Five."),
         ("Give the opposite of hot.", "Cold.")]
SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
           "<|im_end|>")


def tiny_tokenizer():
    """A byte-level BPE of the tests' words, with the special tokens of both chat templates."""
    from numpygpt.finetune.instruct_data import PREAMBLE

    text = " ".join(FRUIT + SPACE + [w for pair in PAIRS for w in pair] + [PREAMBLE, "Instruction Response Input"]) * 3
    tok = train_bpe(text + " user assistant system", 400)
    tok.hf_tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return HFTokenizer(tok.hf_tokenizer, name="tiny")


def save_tiny(directory, family: str, tokenizer, **changes):
    """A tiny random model of ``family`` with ``tokenizer``, as a Hugging Face directory. Its
    vocabulary is rounded up past the tokenizer's, as Qwen3's is."""
    n_vocab = tokenizer.n_vocab + (8 - tokenizer.n_vocab % 8)
    cfg = LlamaConfig.preset(f"{family}-tiny", vocab_size=n_vocab, context_length=128, **changes)
    LlamaModel(cfg, seed=0).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    return {family: save_tiny(tmp_path_factory.mktemp(family), family, tokenizer) for family in FAMILIES}


# -- the classifier's model ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True])
def test_classifier_gradients_match_finite_differences(family, lora):
    rng = np.random.default_rng(0)
    V, PAD = 13, 12
    model = LlamaModel(LlamaConfig.preset(f"{family}-tiny", vocab_size=V, dtype="float64"), seed=0)
    model.to_classifier(3, readout="last_non_pad", pad_id=PAD, seed=1)
    for p in model.parameters():
        p.data = to_dev(0.5 * rng.standard_normal(p.shape), "float64")
    if lora:
        apply_lora(model, rank=2, alpha=3.0, seed=0)
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.data = to_dev(0.3 * rng.standard_normal(p.shape), "float64")
    idx = rng.integers(0, PAD, (3, 9))
    idx[0, 4:] = idx[2, 2:] = PAD  # rows of different lengths, right-padded
    errors = check_model_loss(model, CrossEntropyLoss(), to_dev(idx), to_dev(rng.integers(0, 3, 3)), eps=1e-5,
                              max_coords=6)
    assert set(errors) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("score.lora_A" in errors) == lora and "score.weight" in errors or lora
    assert_grads_ok(errors)


def test_classifier_reads_the_last_non_padding_token_and_set_trainable_picks_the_parts():
    model = LlamaModel(LlamaConfig.preset("qwen3-tiny", dtype="float64"), seed=0).to_classifier(2, "last_non_pad",
                                                                                                  pad_id=0, seed=1)
    ids = np.array([[5, 6, 7, 0, 0]])
    np.testing.assert_allclose(model(ids), model(ids[:, :3]), rtol=1e-12)  # the padding is never read
    assert model.cfg.num_classes == 2 and model.lm_head is None and model.head is model.score
    model.set_trainable("last-block")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("model.layers.1.", "model.norm.", "score."))}
    with pytest.raises(ValueError, match="unknown choice"):
        model.set_trainable("h.1")


@pytest.mark.parametrize("lora", [False, True])
def test_a_classifier_checkpoint_rebuilds_the_classifier(tmp_path, lora):
    from numpygpt.checkpoint import load_checkpoint, save_checkpoint

    model = LlamaModel(LlamaConfig.preset("llama-tiny", tie_weights=False), seed=0).to_classifier(3, seed=1)
    if lora:
        apply_lora(model, rank=2, alpha=4.0, seed=2)
    save_checkpoint(tmp_path / "ckpt.safetensors", model, step=1)
    restored = load_checkpoint(tmp_path / "ckpt.safetensors")["model"]
    assert restored.cfg == model.cfg and restored.is_classifier
    ids = np.array([[3, 4, 5, 6]])
    np.testing.assert_array_equal(restored(ids), model(ids))


# -- the commands ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classify_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(200):
        spam = i % 2 == 1
        lines.append(f"{'spam' if spam else 'ham'}\t{' '.join(rng.choice(SPACE if spam else FRUIT, rng.integers(3, 7)))}")
    path = tmp_path_factory.mktemp("data") / "messages.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True])
def test_finetune_classify_learns_saves_and_classifies(models, classify_data, tmp_path, capsys, family, lora):
    out = tmp_path / "out"
    extra = ["--lora-rank", "4", "--lr", "1e-2"] if lora else ["--trainable", "all", "--lr", "3e-3"]
    assert main(["finetune", "classify", "--pretrained", str(models[family]), "--data", str(classify_data),
                 "--out", str(out), "--device", "cpu", "--no-progress", "--epochs", "3", "--eval-freq", "10",
                 "--readout", "last_non_pad", *extra]) == 0
    printed = capsys.readouterr().out
    assert f": {family}, emb_dim 32, 2 layers" in printed
    history = json.loads((out / "history.json").read_text())
    assert history["train_losses"][-1] < history["train_losses"][0]
    assert history["accuracy"]["test"] >= 0.9, history["accuracy"]
    assert (out / "tokenizer.json").is_file() and (out / "lora-adapters.safetensors").is_file() == lora
    loaded = numpygpt.from_pretrained(out)
    assert isinstance(loaded, LlamaModel) and loaded.cfg.model_type == family and loaded.cfg.num_classes == 2
    assert loaded.cfg.lora_rank is None
    assert main(["classify", "--model", str(out), "--device", "cpu", "melon mango pear", "comet star orbit"]) == 0
    assert capsys.readouterr().out.split() == ["ham", "spam"]


def instruction_file(directory, n=20):
    path = directory / "data.json"
    path.write_text(json.dumps([{"instruction": i, "input": "", "output": o} for i, o in PAIRS] * n))
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True])
def test_finetune_instruct_learns_the_answers_and_chat_answers(models, tmp_path, capsys, family, lora):
    out = tmp_path / "out"
    extra = ["--lora-rank", "8", "--lr", "1e-2"] if lora else ["--lr", "5e-3"]
    assert main(["finetune", "instruct", "--pretrained", str(models[family]), "--data", str(instruction_file(tmp_path)),
                 "--out", str(out), "--batch-size", "4", "--epochs", "4", "--mask-instruction", "--eval-freq", "20",
                 "--eval-iter", "1", "--max-new-tokens", "8", "--device", "cpu", "--no-progress", *extra]) == 0
    capsys.readouterr()
    history = json.loads((out / "history.json").read_text())
    responses = json.loads((out / "test-responses.json").read_text())
    model_dir = out / "model"
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "lora-adapters.safetensors").is_file() == lora
    assert isinstance(numpygpt.from_pretrained(model_dir), LlamaModel)
    if lora:  # adapters on a random tiny model with a frozen tied embedding learn slowly: the loss falls
        assert history["final_losses"][0] < history["train_losses"][0] - 0.05 and len(responses) == 6
        return
    assert history["final_losses"][0] < history["train_losses"][0] / 4
    assert sum(r["model_response"] == r["output"] for r in responses) >= len(responses) - 1, responses
    assert main(["chat", "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "8",
                 "What is two plus three?"]) == 0
    assert capsys.readouterr().out.strip() == "Five."


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_dpo_moves_the_margins(models, tmp_path, capsys, family):
    prefs = tmp_path / "prefs.json"
    prefs.write_text(json.dumps([{"instruction": i, "input": "", "output": o, "chosen": "Thank you! " + o,
                                  "rejected": o + " Obviously."} for i, o in PAIRS] * 8))
    out = tmp_path / "out"
    assert main(["finetune", "dpo", "--model", str(models[family]), "--data", str(prefs), "--out", str(out),
                 "--batch-size", "2", "--lr", "3e-3", "--beta", "0.5", "--eval-freq", "5", "--eval-iter", "2",
                 "--lora-rank", "4", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    history = json.loads((out / "history.json").read_text())
    assert history["val_margins"][-1] > history["val_margins"][0] and history["val_reward_accs"][-1] == 1.0
    assert history["test_metrics"]["loss"] < np.log(2)
    assert isinstance(numpygpt.from_pretrained(out / "model"), LlamaModel)


def test_a_run_folder_of_a_llama_is_a_model_to_fine_tune(models, classify_data, tmp_path, capsys):
    """`--pretrained` takes a checkpoint file or a run folder of any family, with its tokenizer."""
    from numpygpt.checkpoint import save_checkpoint
    from numpygpt.tokenizer import load_tokenizer, save_tokenizer

    run = tmp_path / "run"
    model = numpygpt.from_pretrained(models["llama"])
    record = save_tokenizer(load_tokenizer(models["llama"]), run)
    save_checkpoint(run / "checkpoint.safetensors", model, extra={"tokenizer": record})
    out = tmp_path / "out"
    assert main(["finetune", "classify", "--pretrained", str(run), "--data", str(classify_data), "--out", str(out),
                 "--device", "cpu", "--no-progress", "--epochs", "1", "--max-steps", "2"]) == 0
    assert ": llama, emb_dim 32" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()
    assert main(["finetune", "instruct", "--pretrained", str(models["llama"]), "--drop-rate", "0.1",
                 "--data", str(instruction_file(tmp_path, 4)), "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "a llama model has no dropout" in capsys.readouterr().err
