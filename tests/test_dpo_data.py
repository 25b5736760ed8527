"""Preference data for DPO: the book's format and its checks, the 85/10/5 split, the collate
worked out by hand, masks that count exactly the response tokens, and padding that does not
change a sequence's log-probability."""

import json

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, backend, no_grad
from numpygpt.finetune.dpo_data import (BATCH_KEYS, PreferenceDataset, PreferencePair, collate_preferences,
                                        load_preference_data, split_data, validate_preferences)
from numpygpt.finetune.instruct_data import RESPONSE_HEADER, format_input
from numpygpt.nn.dpo import sequence_logprobs
from numpygpt.tokenizer import get_tokenizer

P = 50256  # padding (end of text)
ENTRY = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
         "output": "The car is as fast as lightning.", "chosen": "The car is as fast as lightning.",
         "rejected": "The car is fast, obviously."}


def pair(prompt, chosen, rejected):
    return PreferencePair(np.array(prompt + chosen), np.array(prompt + rejected), len(prompt))


def test_collate_by_hand():
    batch = [pair([1, 2, 3], [4, 5], [6]), pair([7, 8], [9], [10, 11, 12, 13])]
    out = collate_preferences(batch)
    assert set(out) == set(BATCH_KEYS)
    F, T = False, True
    np.testing.assert_array_equal(out["chosen"], [[1, 2, 3, 4, 5], [7, 8, 9, P, P]])
    np.testing.assert_array_equal(out["chosen_targets"], [[2, 3, 4, 5, P], [8, 9, P, P, P]])
    np.testing.assert_array_equal(out["chosen_mask"], [[F, F, T, T, F], [F, T, F, F, F]])
    np.testing.assert_array_equal(out["rejected"], [[1, 2, 3, 6, P], [7, 8, 10, 11, 12]])
    np.testing.assert_array_equal(out["rejected_targets"], [[2, 3, 6, P, P], [8, 10, 11, 12, 13]])
    np.testing.assert_array_equal(out["rejected_mask"], [[F, F, T, F, F], [F, T, T, T, T]])
    assert out["chosen"].dtype == np.int64 and out["chosen_mask"].dtype == bool
    cut = collate_preferences(batch, allowed_max_length=3)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(cut[key], out[key][:, :3])
        assert cut[key].flags.c_contiguous
    with pytest.raises(ValueError, match="empty batch"):
        collate_preferences([])


def test_masks_count_exactly_the_response_tokens():
    tokenizer = get_tokenizer()
    second = {**ENTRY, "input": "", "chosen": "Yes.", "rejected": "No, and here is a much longer answer."}
    batch = collate_preferences(PreferenceDataset([ENTRY, second], tokenizer).pairs)
    for row, entry in enumerate((ENTRY, second)):
        for key in ("chosen", "rejected"):
            counted = batch[key + "_targets"][row][batch[key + "_mask"][row]]
            assert tokenizer.decode(counted.tolist()) == entry[key]
            text = tokenizer.decode(batch[key][row][: len(tokenizer.encode(format_input(entry) + RESPONSE_HEADER))]
                                    .tolist())
            assert text == format_input(entry) + RESPONSE_HEADER


def test_padding_does_not_change_the_logprob():
    """Right padding: under the causal mask the real tokens' logits, and so a sequence's
    log-probability, are those of the unpadded text."""
    cfg = GPTConfig(vocab_size=20, context_length=16, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0,
                    dtype="float64")
    model = GPTModel(cfg, seed=0).eval()
    short, long_ = pair([1, 2], [3, 4], [5, 6, 7, 8, 9, 10]), pair([1, 2, 11], [12], [13])
    padded = collate_preferences([short, long_], pad_id=19)
    assert padded["chosen"].shape == (2, 7)  # the short chosen text (4 tokens) is padded to 8
    with no_grad():
        logp = sequence_logprobs(model(padded["chosen"]), padded["chosen_targets"], padded["chosen_mask"])
        alone = sequence_logprobs(model(np.array([[1, 2, 3]])), np.array([[2, 3, 4]]), np.array([[0, 1, 1]]))
    np.testing.assert_allclose(backend.to_host(logp)[0], backend.to_host(alone)[0], rtol=1e-12)


def test_split_is_chapter_7s(tmp_path):
    entries = [{**ENTRY, "instruction": f"i{k}"} for k in range(100)]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(entries))
    train, test, val = split_data(load_preference_data(path))
    assert (len(train), len(test), len(val)) == (85, 10, 5)
    assert [e["instruction"] for e in train + test + val] == [f"i{k}" for k in range(100)]


@pytest.mark.parametrize("change, message", [
    ({"chosen": None}, "entry 1 has no 'chosen' response"),
    ({"rejected": None}, "entry 1 has no 'rejected' response"),
    ({"chosen": "   "}, "entry 1's 'chosen' response is empty"),
    ({"rejected": ""}, "entry 1's 'rejected' response is empty"),
    ({"rejected": 3}, "entry 1's 'rejected' is a int, not a string"),
    ({"instruction": ""}, "entry 1's 'instruction' is empty"),
])
def test_bad_entries_are_one_clear_error(change, message):
    bad = {k: v for k, v in {**ENTRY, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        validate_preferences([ENTRY, bad], "prefs.json")


def test_output_and_input_are_optional(tmp_path):
    entry = {"instruction": "Say hi.", "chosen": "Hello, nice to meet you.", "rejected": "What."}
    assert validate_preferences([entry])[0]["input"] == ""
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preference_data(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_data(tmp_path / "missing.json")


def test_a_prompt_longer_than_the_allowed_length_is_refused():
    tokenizer = get_tokenizer()
    n_prompt = len(tokenizer.encode(format_input(ENTRY) + RESPONSE_HEADER))
    with pytest.raises(ValueError, match=f"entry 0's prompt is {n_prompt} tokens, more than the allowed length"):
        PreferenceDataset([ENTRY], tokenizer, max_length=n_prompt - 1)
    dataset = PreferenceDataset([ENTRY], tokenizer, max_length=n_prompt + 2)
    assert dataset.too_long == [0]  # the responses are cut, one token at least is kept
    batch = collate_preferences(dataset.pairs, allowed_max_length=n_prompt)
    assert batch["chosen_mask"].sum() == 1 and batch["rejected_mask"].sum() == 1
