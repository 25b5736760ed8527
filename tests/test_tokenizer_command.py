"""Bits per character against hand computations, and ``numpygpt tokenizer train``."""

import argparse
import math

import pydoc_data.topics
import pytest

from numpygpt.tokenizer import bits_per_character, load_tokenizer, text_bits_per_character, train_bpe
from numpygpt.tokenizer.command import TokenizerTrainOptions, add_tokenizer_args, run_tokenizer_train


def test_bits_per_character_by_hand():
    # 2 nats a token, 150 tokens for 400 characters: 300 nats = 432.808 bits, / 400
    assert bits_per_character(2.0, 150, 400) == pytest.approx(300 / math.log(2) / 400, rel=1e-12)
    assert bits_per_character(2.0, 150, 400) == pytest.approx(1.0820212806, rel=1e-9)
    # a uniform guess over 256 bytes, one token a character: 8 bits a character
    assert bits_per_character(math.log(256), 1000, 1000) == pytest.approx(8.0, rel=1e-12)
    with pytest.raises(ValueError):
        bits_per_character(1.0, 10, 0)


def test_text_bits_per_character_counts_the_tokenizers_tokens():
    tok = train_bpe("the cat and the hat " * 20, 270)
    text = "the cat and the hat"
    n_tokens = len(tok.encode_ordinary(text))
    assert n_tokens < len(text)
    assert text_bits_per_character(1.5, tok, text) == pytest.approx(1.5 * n_tokens / len(text) / math.log(2))


def parse(argv):
    parser = argparse.ArgumentParser(prog="numpygpt")
    add_tokenizer_args(parser.add_subparsers(dest="command").add_parser("tokenizer"))
    return parser.parse_args(argv)


def test_tokenizer_train_command(tmp_path):
    data = tmp_path / "book.txt"
    data.write_text(pydoc_data.topics.topics["compound"], encoding="utf-8")
    args = parse(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    lines = []
    tok = run_tokenizer_train(args, say=lines.append)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.n_vocab == tok.n_vocab == 300
    assert loaded.encode_ordinary("the while statement") == tok.encode_ordinary("the while statement")
    assert "300-token" in lines[0] and str(tmp_path / "tok" / "tokenizer.json") in lines[-1]


def test_tokenizer_train_defaults_and_errors(tmp_path, capsys):
    args = parse(["tokenizer", "train"])
    assert (args.data, args.vocab_size, args.out) == (None, 4096, "runs/tokenizer") == (
        TokenizerTrainOptions().data, TokenizerTrainOptions().vocab_size, TokenizerTrainOptions().out)
    with pytest.raises(SystemExit):
        parse(["tokenizer", "train", "--vocab-size", "256"])
    assert "at least 257" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        run_tokenizer_train(TokenizerTrainOptions(data=str(tmp_path / "nowhere.txt"), out=str(tmp_path)))
    small = tmp_path / "small.txt"
    small.write_text("ab ab ab")
    lines = []
    run_tokenizer_train({"data": str(small), "vocab_size": 1000, "out": str(tmp_path / "s")}, say=lines.append)
    assert any("too few distinct pairs" in line for line in lines)
