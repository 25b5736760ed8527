"""Instruction fine-tuning (chapter 7): the prompt format, the split, the padding collate
worked out by hand, padding that does not change the loss, and the untied pretrained head."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numpygpt import CrossEntropyLoss, GPTConfig, GPTModel, backend, no_grad
from numpygpt.data import DataLoader
from numpygpt.finetune.instruct import (Example, InstructionDataset, collate_instructions, extract_response,
                                        format_example, format_input, load_instruction_data, split_data,
                                        validate_entries)

P, X = 50256, -100  # padding (end of text) and the ignored target


# -- the prompt ----------------------------------------------------------------------------

def test_prompt_with_input():
    entry = {"instruction": "Evaluate the following phrase by transforming it into the spelling given.",
             "input": "freind --> friend", "output": "The spelling of the given phrase \"freind\" is incorrect, "
             "the correct spelling is \"friend\"."}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nEvaluate the following phrase by transforming it into the spelling given."
        "\n\n### Input:\nfreind --> friend")
    assert format_example(entry) == format_input(entry) + (
        "\n\n### Response:\nThe spelling of the given phrase \"freind\" is incorrect, the correct spelling is \"friend\".")


def test_prompt_without_input():
    entry = {"instruction": "What is an antonym of 'complicated'?", "input": "",
             "output": "An antonym of 'complicated' is 'simple'.", "extra": "ignored"}
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
                "\n\n### Instruction:\nWhat is an antonym of 'complicated'?")
    assert format_input(entry) == expected
    assert format_input({"instruction": entry["instruction"], "output": "x"}) == expected  # no input key at all
    assert format_example(entry) == expected + "\n\n### Response:\nAn antonym of 'complicated' is 'simple'."


def test_extract_response():
    assert extract_response(" \n\n### Response:\n  The answer. \n") == "The answer."
    # the book's .replace("### Response:", ""): every header goes, the text around it stays
    assert extract_response("The answer.\n### Response: again") == "The answer.\n again"
    assert extract_response("  no header here ") == "no header here"


# -- the data ------------------------------------------------------------------------------

def test_split_sizes_and_order():
    entries = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(1100)]
    train, test, val = split_data(entries)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0]["instruction"] == "i0" and test[0]["instruction"] == "i935" and val[0]["instruction"] == "i1045"
    assert train + test + val == entries


@pytest.mark.parametrize("data, message", [
    ({"instruction": "a", "output": "b"}, "expected a JSON list"),
    ([], "empty"),
    ([{"instruction": "a", "output": "b"}, {"input": "x", "output": "b"}], "entry 1 has no 'instruction'"),
    ([{"instruction": "a", "input": ""}], "entry 0 has no 'output'"),
    ([{"instruction": "a", "output": 3}], "entry 0's 'output' is a int"),
    (["just text"], "entry 0 is a str"),
    ([{"instruction": "a", "input": ["x"], "output": "b"}], "entry 0's 'input' is a list"),
])
def test_bad_entries_are_named(data, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        validate_entries(data)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_instruction_data(path)


def test_load_fills_missing_input_and_rejects_non_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"}]))
    assert [e["input"] for e in load_instruction_data(path)] == ["", ""]
    path.write_text("[{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_instruction_data(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_instruction_data(tmp_path / "missing.json")


def test_dataset_tokenises_text_and_prompt_and_flags_long_entries():
    from numpygpt.tokenizer import get_tokenizer

    tok = get_tokenizer()
    entries = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
               {"instruction": "Repeat.", "input": "word " * 40, "output": "word " * 40}]
    ds = InstructionDataset(entries, tok, max_length=60)
    assert len(ds) == 2
    ex = ds[0]
    assert ex.token_ids.tolist() == tok.encode(format_example(entries[0]))
    assert ex.prompt_length == len(tok.encode(format_input(entries[0])))
    assert len(ds[1].token_ids) > 60 >= len(ex.token_ids)
    assert ds.too_long == [1]


# -- the collate function, worked out by hand ------------------------------------------------

A, B, C = [1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]  # lengths 3, 5, 7: L = 8


def test_collate_pads_shifts_and_masks_all_padding_but_the_first():
    inputs, targets = collate_instructions([A, B, C])
    assert inputs.dtype == targets.dtype == np.int64
    assert inputs.tolist() == [[1, 2, 3, P, P, P, P],
                               [4, 5, 6, 7, 8, P, P],
                               [9, 10, 11, 12, 13, 14, 15]]
    assert targets.tolist() == [[2, 3, P, X, X, X, X],
                                [5, 6, 7, 8, P, X, X],
                                [10, 11, 12, 13, 14, 15, P]]


def test_collate_cuts_to_allowed_max_length():
    larger = collate_instructions([A, B, C], allowed_max_length=100)
    assert [a.tolist() for a in larger] == [a.tolist() for a in collate_instructions([A, B, C])]
    inputs, targets = collate_instructions([A, B, C], allowed_max_length=4)
    assert inputs.tolist() == [[1, 2, 3, P], [4, 5, 6, 7], [9, 10, 11, 12]]
    assert targets.tolist() == [[2, 3, P, X], [5, 6, 7, 8], [10, 11, 12, 13]]


def test_collate_masks_the_instruction():
    batch = [Example(np.array(A), 2), Example(np.array(B), 3), Example(np.array(C), 4)]
    inputs, targets = collate_instructions(batch, mask_instruction=True)
    assert inputs.tolist() == [[1, 2, 3, P, P, P, P],
                               [4, 5, 6, 7, 8, P, P],
                               [9, 10, 11, 12, 13, 14, 15]]
    assert targets.tolist() == [[X, 3, P, X, X, X, X],  # prompt 1, 2: the target 2 is masked
                                [X, X, 7, 8, P, X, X],
                                [X, X, X, 13, 14, 15, P]]
    inputs, targets = collate_instructions(batch, mask_instruction=True, allowed_max_length=4)
    assert inputs.tolist() == [[1, 2, 3, P], [4, 5, 6, 7], [9, 10, 11, 12]]
    assert targets.tolist() == [[X, 3, P, X], [X, X, 7, 8], [X, X, X, 13]]
    # without the flag, Example items collate like their ids
    unmasked = collate_instructions(batch)
    assert unmasked[1].tolist() == collate_instructions([A, B, C])[1].tolist()


def book_collate(batch, pad_id, ignore_index, allowed_max_length, mask_instruction):
    """The book's custom_collate_fn (with exercise 7.2's masking), row by row in plain lists."""
    L = max(len(ex.token_ids) for ex in batch) + 1
    inputs, targets = [], []
    for ex in batch:
        padded = list(ex.token_ids) + [pad_id] * (L - len(ex.token_ids))
        x, y = padded[:-1], padded[1:]
        pads = [j for j, t in enumerate(y) if t == pad_id]
        for j in pads[1:]:
            y[j] = ignore_index
        if mask_instruction:
            y[:ex.prompt_length - 1] = [ignore_index] * len(y[:ex.prompt_length - 1])
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return inputs, targets


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), data=st.data(),
       allowed=st.one_of(st.none(), st.integers(1, 15)), mask=st.booleans())
def test_collate_matches_the_books_row_by_row(lengths, data, allowed, mask):
    rng = np.random.default_rng(len(lengths) * 100 + sum(lengths))
    batch = [Example(rng.integers(0, 99, n), data.draw(st.integers(1, n))) for n in lengths]
    inputs, targets = collate_instructions(batch, pad_id=99, ignore_index=-7, allowed_max_length=allowed,
                                           mask_instruction=mask)
    ref_inputs, ref_targets = book_collate(batch, 99, -7, allowed, mask)
    assert inputs.tolist() == ref_inputs and targets.tolist() == ref_targets


def test_collate_options_and_errors():
    inputs, targets = collate_instructions([[7], [1, 2]], pad_id=0, ignore_index=-1)
    assert inputs.tolist() == [[7, 0], [1, 2]]
    assert targets.tolist() == [[0, -1], [2, 0]]
    with pytest.raises(ValueError, match="Example items"):
        collate_instructions([A], mask_instruction=True)
    with pytest.raises(ValueError, match="empty"):
        collate_instructions([])
    with pytest.raises(ValueError, match="non-empty"):
        collate_instructions([[]])


def test_dataloader_collate_fn():
    from functools import partial

    items = [np.array(s) for s in (A, B, C, [16, 17])]
    loader = DataLoader(items, 2, shuffle=False, drop_last=False, collate_fn=partial(collate_instructions, pad_id=0))
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0][0].tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]
    assert batches[1][1].tolist() == [[10, 11, 12, 13, 14, 15, 0], [17, 0, -100, -100, -100, -100, -100]]


# -- right padding changes nothing on the real tokens -------------------------------------------

def test_padded_and_unpadded_loss_agree_on_real_tokens():
    backend.set_device("cpu")
    cfg = GPTConfig.preset("tiny", vocab_size=64, dtype="float64")
    model = GPTModel(cfg, seed=3).eval()
    rng = np.random.default_rng(0)
    short, long = rng.integers(0, 63, 6), rng.integers(0, 63, 13)
    loss_fn = CrossEntropyLoss()
    with no_grad():
        x1, y1 = collate_instructions([short], pad_id=63)
        alone_logits = model(x1)
        alone = float(loss_fn(alone_logits, y1))
        xb, yb = collate_instructions([short, long], pad_id=63)
        batch_logits = model(xb)
        padded = float(loss_fn(batch_logits[:1], yb[:1]))
    assert xb.shape[1] > x1.shape[1]  # row 0 really is padded further in the batch
    np.testing.assert_allclose(batch_logits[0, :x1.shape[1]], alone_logits[0], rtol=0, atol=1e-12)
    assert padded == pytest.approx(alone, abs=1e-12)


# -- the untied head of a pretrained model -------------------------------------------------------

def test_from_pretrained_untied_head_is_a_copy_of_wte(tmp_path):
    from numpygpt.config import count_parameters

    from_pretrained = GPTModel.from_pretrained

    backend.set_device("cpu")
    cfg = GPTConfig.preset("tiny", tie_weights=True, qkv_bias=True)
    GPTModel(cfg, seed=1).save_pretrained(tmp_path)
    tied = from_pretrained(tmp_path)
    untied = from_pretrained(tmp_path, tie_weights=False)
    assert tied.cfg.tie_weights and not untied.cfg.tie_weights
    assert untied.lm_head.weight is not untied.wte.weight
    np.testing.assert_array_equal(untied.lm_head.weight.data, tied.wte.weight.data)
    np.testing.assert_array_equal(untied.wte.weight.data, tied.wte.weight.data)
    assert untied.num_parameters() == count_parameters(cfg, tied=False)
    untied.lm_head.weight.data += 1.0  # a copy: the embedding does not move with it
    np.testing.assert_array_equal(untied.wte.weight.data, tied.wte.weight.data)
    # a file with a separate head cannot be tied
    untied.save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match="tie_weights=True"):
        from_pretrained(tmp_path / "untied", tie_weights=True)
