"""Trained byte-level BPE tokenizers (numpygpt.tokenizer.hf): layout, special tokens,
round trips, determinism, and tokenizer.json files, ours and a Qwen3-like one."""

import json
import subprocess
import sys

import numpy as np
import pydoc_data.topics
import pytest
from hypothesis import given, settings, strategies as st

from numpygpt.data import GPTDataset
from numpygpt.tokenizer import (EOT, HFTokenizer, TokenizerError, get_tokenizer, load_tokenizer_json, merges_of,
                                text_to_token_ids, token_ids_to_text, train_bpe)

CORPUS = "".join(list(pydoc_data.topics.topics.values())[:40])  # ~100 kB of Python's manual


@pytest.fixture(scope="module")
def trained():
    return train_bpe(CORPUS, 1000)


def token_bytes(tok, i):
    from numpygpt.bpe import byte_to_unicode

    decoder = {c: b for b, c in byte_to_unicode().items()}
    return bytes(decoder[c] for c in tok.hf_tokenizer.id_to_token(i))


def test_layout_is_gpt2s(trained):
    gpt2 = get_tokenizer()
    assert trained.n_vocab == 1000
    assert trained.eot_token == 999 == trained.hf_tokenizer.token_to_id(EOT)
    assert trained.special_tokens_set == {EOT}
    assert [token_bytes(trained, i) for i in range(256)] == [gpt2.decode_single_token_bytes(i) for i in range(256)]
    merges = merges_of(trained)
    assert len(merges) == 1000 - 257
    assert [token_bytes(trained, 256 + i) for i in range(3)] == [a + b for a, b in merges[:3]]


def test_trained_on_the_corpus_it_compresses_better_than_bytes(trained):
    ids = trained.encode_ordinary(CORPUS)
    assert len(ids) < len(CORPUS.encode("utf-8")) / 2.5  # 2.9 bytes a token with 1000 tokens
    assert len(trained.encode_ordinary(" the")) == 1


def test_end_of_text_separates_documents_and_is_never_learned():
    tok = train_bpe("<|endoftext|>".join(["alpha beta"] * 50), 400)
    assert all(b"<|" not in token_bytes(tok, i) and b"endoftext" not in token_bytes(tok, i)
               for i in range(tok.n_vocab - 1))
    assert tok.encode("beta<|endoftext|>alpha", allowed_special={EOT}) == (
        tok.encode_ordinary("beta") + [tok.eot_token] + tok.encode_ordinary("alpha"))


def test_special_tokens_follow_tiktoken(trained):
    gpt2 = get_tokenizer()
    text = "a<|endoftext|>b"
    for tok in (trained, gpt2):  # the same rules as GPT-2's tiktoken Encoding
        with pytest.raises(ValueError):
            tok.encode(text)
        assert tok.encode(text, allowed_special="all") == tok.encode(text, allowed_special={EOT})
        assert tok.eot_token in tok.encode(text, allowed_special={EOT})
        assert tok.eot_token not in tok.encode(text, disallowed_special=())
        assert tok.encode(text, disallowed_special=()) == tok.encode_ordinary(text)
        assert tok.decode(tok.encode_ordinary(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_text(trained, text):
    ids = trained.encode(text, allowed_special={EOT})
    assert trained.decode(ids) == text
    assert token_ids_to_text(text_to_token_ids(text, trained), trained) == text
    assert all(0 <= i < trained.n_vocab for i in ids)


def test_deterministic_within_and_across_processes(trained):
    again = train_bpe(CORPUS, 1000)
    assert again.hf_tokenizer.to_str() == trained.hf_tokenizer.to_str()
    # Rust's hash maps are seeded per process: a fresh interpreter must agree too.
    code = ("import pydoc_data.topics, sys; from numpygpt.tokenizer import train_bpe; "
            "text = ''.join(list(pydoc_data.topics.topics.values())[:40]); "
            "sys.stdout.write(train_bpe(text, 1000).hf_tokenizer.to_str())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == trained.hf_tokenizer.to_str()


def test_save_and_load(trained, tmp_path):
    path = trained.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for source in (tmp_path / "tok", path):
        loaded = load_tokenizer_json(source)
        assert loaded.n_vocab == trained.n_vocab and loaded.eot_token == trained.eot_token
        assert loaded.encode(CORPUS[:2000]) == trained.encode(CORPUS[:2000])
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_works_with_the_data_pipeline(trained):
    ids = text_to_token_ids(CORPUS[:5000], trained)
    assert ids.dtype == np.int64 and ids.max() < trained.n_vocab
    dataset = GPTDataset.from_text(CORPUS[:5000], trained, max_length=16, stride=16)
    inputs, targets = dataset[0]
    assert inputs.tolist() == ids[:16].tolist() and targets.tolist() == ids[1:17].tolist()
    with pytest.raises(ValueError, match="1000"):
        token_ids_to_text([5, 1000], trained)


def test_qwen3_like_tokenizer_json(tmp_path):
    # Qwen3's tokenizer.json: byte-level BPE plus added tokens, most of them special
    # (<|endoftext|>, <|im_start|>, <|im_end|>) and some not (<think>), which are
    # matched in any text like ordinary vocabulary.
    from tokenizers import AddedToken

    tok = train_bpe(CORPUS[:20000], 400)
    tok.hf_tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                                         AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.hf_tokenizer.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    loaded = load_tokenizer_json(HFTokenizer(tok.hf_tokenizer).save(tmp_path))
    assert loaded.n_vocab == 403
    assert loaded.special_tokens_set == {EOT, "<|im_start|>", "<|im_end|>"}
    start, end = loaded.token_id("<|im_start|>"), loaded.token_id("<|im_end|>")
    ids = loaded.encode("<|im_start|>user\nhi<think><|im_end|>", allowed_special="all")
    assert ids[0] == start and ids[-1] == end and 402 in ids
    assert loaded.encode_ordinary("<think>") == [402]
    assert loaded.decode(ids) == "<|im_start|>user\nhi<think><|im_end|>"
    with pytest.raises(TokenizerError, match="no special token"):
        loaded.token_id("<|eot_id|>")


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe("abc", 256)
    with pytest.raises(TypeError):
        train_bpe(b"abc", 300)
    small = train_bpe("ab ab", 1000)  # too little text for 1000 tokens: stops early
    assert small.n_vocab < 1000 and small.eot_token == small.n_vocab - 1
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        load_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer_json(tmp_path)
