"""The translation task: number words, the tokenizer, the pairs, the objective in the one
loop, and a tiny end-to-end run that must translate held-out numbers."""

import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from numpygpt.encdec import EncDecConfig, EncoderDecoder
from numpygpt.optim import AdamW
from numpygpt.translation import (NumberPairs, NumberTokenizer, TranslationObjective, TranslationOptions,
                                  run_translation, sample_numbers, train_translation, words)
from numpygpt.translation.recipe import make_data


@pytest.mark.parametrize("n,text", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (21, "twenty-one"), (100, "one hundred"),
    (101, "one hundred and one"), (312, "three hundred and twelve"), (1000, "one thousand"),
    (1012, "one thousand and twelve"), (1100, "one thousand one hundred"), (21000, "twenty-one thousand"),
    (100001, "one hundred thousand and one"),
    (999999, "nine hundred and ninety-nine thousand nine hundred and ninety-nine"),
])
def test_words(n, text):
    assert words(n) == text


def test_words_are_distinct_and_round_trip_through_the_tokenizer():
    tok = NumberTokenizer()
    numbers = list(range(0, 3000)) + list(range(0, 1_000_000, 997))
    texts = [words(n) for n in numbers]
    assert len(set(texts)) == len(set(numbers))
    for n, text in zip(numbers, texts):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(str(n)) + [tok.eos_id, 7]) == str(n)  # stops at <eos>
    with pytest.raises(ValueError, match="unknown"):
        tok.encode("three hundred and twelfty")
    with pytest.raises(ValueError):
        words(1_000_000)


def test_sample_numbers_are_distinct_and_spread_over_lengths():
    numbers = sample_numbers(3000, np.random.default_rng(0))
    assert len(set(numbers.tolist())) == 3000 and numbers.min() >= 0 and numbers.max() <= 999_999
    lengths = np.bincount([len(str(n)) for n in numbers], minlength=7)[1:]
    assert lengths[:2].tolist() == [10, 90] and (lengths[2:] > 450).all()  # every 1- and 2-digit number; the rest even


def test_pairs_both_directions_padded():
    tok = NumberTokenizer()
    pairs = NumberPairs([312, 7], tok)
    batch = pairs.get_batch(np.arange(4))
    assert [tok.decode(batch["src"][r]) for r in range(4)] == ["three hundred and twelve", "312", "seven", "7"]
    assert batch["src"][:, 0].tolist() == [tok.to_digits_id, tok.to_words_id] * 2
    assert tok.decode(batch["tgt_out"][0].clip(0)) == "312" and tok.decode(batch["tgt_out"][1].clip(0)) == words(312)
    # teacher forcing: tgt_in is <bos> + tgt_out shifted right; padding is -100 in tgt_out only
    keep = batch["tgt_out"] != -100
    assert (batch["tgt_in"][:, 0] == tok.bos_id).all()
    shifted = keep[:, :-1] & (batch["tgt_out"][:, :-1] != tok.eos_id)  # target tokens before <eos>
    np.testing.assert_array_equal(batch["tgt_in"][:, 1:][shifted], batch["tgt_out"][:, :-1][shifted])
    assert (batch["tgt_in"][~keep] == tok.pad_id).all() and pairs.reference(1) == ("312", words(312))


def test_held_out_numbers_are_never_trained_on():
    opts = TranslationOptions(train_numbers=2000, test_numbers=300, seed=5)
    train, test = make_data(opts, NumberTokenizer())
    assert not set(train.numbers.tolist()) & set(test.numbers.tolist())
    assert len(test) == 600


def test_objective_steps_lower_the_loss():
    """A few hand-written steps with the objective's loss and backward: the loss falls, and
    count() is the batch's target tokens."""
    tok = NumberTokenizer()
    pairs = NumberPairs(sample_numbers(32, np.random.default_rng(1)), tok)
    batch = pairs.get_batch(np.arange(len(pairs)))
    cfg = EncDecConfig(vocab_size=tok.vocab_size, context_length=20, emb_dim=32, n_heads=2, n_enc_layers=1,
                       n_dec_layers=1, drop_rate=0.0)
    model = EncoderDecoder(cfg, seed=0)
    objective, optimizer = TranslationObjective(), AdamW(model, lr=3e-3)
    losses = []
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: one BLAS thread is faster
        for _ in range(15):
            losses.append(float(objective.loss(model, batch)))
            objective.backward(model)
            optimizer.step()
            model.zero_grad()
    assert losses[-1] < 0.6 * losses[0]
    assert objective.count(batch) == int((batch["tgt_out"] != -100).sum())


def test_tiny_run_translates_held_out_numbers(tmp_path):
    """Numbers below 1000, a one-block model, 700 steps (~6 s): nearly every held-out number
    comes back exactly (97.5% when written; chance is ~0: a translation is 1 to 8 tokens out of 47)."""
    opts = TranslationOptions(max_number=999, train_numbers=700, test_numbers=100, emb_dim=32, n_heads=2,
                              n_layers=1, epochs=16, batch_size=32, lr=5e-3, eval_freq=1000, no_progress=True,
                              out=str(tmp_path))
    start = time.perf_counter()
    result = train_translation(opts, log=None)
    assert time.perf_counter() - start < 60
    assert result["accuracy"] >= 0.9, result["accuracy"]
    assert len(result["examples"]) == 200
    assert sum(ref == got for _, ref, got in result["examples"]) == round(200 * result["accuracy"])


def test_run_translation_prints_accuracy_and_translations(capsys, tmp_path):
    opts = dict(max_number=99, train_numbers=60, test_numbers=20, emb_dim=16, n_heads=2, n_layers=1, epochs=1,
                batch_size=16, eval_freq=1000, no_progress=True, show=2, out=str(tmp_path))
    assert run_translation(opts) == 0
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "->" in out


def test_command_line(capsys, tmp_path):
    from numpygpt.cli import main

    argv = ["train-translation", "--out", str(tmp_path), "--max-number", "99", "--train-numbers", "40", "--test-numbers", "10",
            "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--no-progress", "--show", "1"]
    assert main(argv) == 0
    assert "held-out exact match" in capsys.readouterr().out
    assert main(argv[:5] + ["--train-numbers", "95"]) == 2
    assert "more than the 100 numbers" in capsys.readouterr().err
