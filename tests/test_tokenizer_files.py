"""Tokenizers of model directories: Llama 3's tokenizer.model through tiktoken, the one
loader, and the vocabulary-size check. Every file is built here; nothing is downloaded."""

import base64

import pytest
from hypothesis import given, settings, strategies as st

from numpygpt.tokenizer import (HFTokenizer, TiktokenModel, TokenizerError, check_same_tokenizer, check_vocab_size,
                                get_tokenizer, load_saved_tokenizer, load_tiktoken_model, load_tokenizer,
                                save_tokenizer, tokenizer_record, train_bpe)

MERGED = [b"he", b"ll", b"hell", b" t", b" th", b" the", b"12", b"123"]
N_BASE = 256 + len(MERGED)


def write_tiktoken_file(path, tokens):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def llama_dir(tmp_path):
    # Ranks 0-255 are the bytes in byte order (Llama 3's own file orders them otherwise;
    # tiktoken only needs each byte present), then the merged tokens.
    write_tiktoken_file(tmp_path / "llama" / "original" / "tokenizer.model",
                        [bytes([b]) for b in range(256)] + MERGED)
    return tmp_path / "llama"


def test_llama3_tokenizer_model(llama_dir):
    tok = load_tokenizer(llama_dir)  # found in original/
    assert isinstance(tok, TiktokenModel) and tok.name == "llama"
    assert tok.n_vocab == N_BASE + 256
    # "hello": h+e (rank 256) first, then l+l (257), then he+ll (258); "o" stays a byte.
    assert tok.encode("hello") == [258, ord("o")]
    assert tok.encode(" the") == [261]
    # Llama 3's pattern cuts digits into groups of three: "121" + "2", where GPT-2's
    # pattern would keep "1212" whole and give 12 + 12.
    assert tok.encode("1212") == [262, ord("1"), ord("2")]
    specials = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|finetune_right_pad_id|>": 4,
                "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9,
                "<|python_tag|>": 10, "<|reserved_special_token_2|>": 5, "<|reserved_special_token_3|>": 11,
                "<|reserved_special_token_247|>": 255}
    for name, offset in specials.items():
        assert tok.token_id(name) == N_BASE + offset
    assert len(tok.special_tokens_set) == 256
    assert tok.eot_token == N_BASE + 1
    ids = tok.encode("<|begin_of_text|>hello<|eot_id|>", allowed_special="all")
    assert ids == [N_BASE, 258, ord("o"), N_BASE + 9]
    with pytest.raises(ValueError):
        tok.encode("<|eot_id|>")  # special text needs allowed_special, as with GPT-2
    with pytest.raises(TokenizerError, match="no special token"):
        tok.token_id("<|im_start|>")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_llama3_round_trip(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "round_trip" / "tokenizer.model"
    if not path.exists():
        write_tiktoken_file(path, [bytes([b]) for b in range(256)] + MERGED)
    tok = load_tiktoken_model(path)
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_loader_picks_the_file(llama_dir, tmp_path):
    assert load_tokenizer("gpt2") is get_tokenizer()
    assert isinstance(load_tokenizer(llama_dir / "original" / "tokenizer.model"), TiktokenModel)
    # tokenizer.json wins when a directory has both (Llama 3's Hugging Face layout)
    train_bpe("some text for a tokenizer", 300).save(llama_dir)
    both = load_tokenizer(llama_dir)
    assert isinstance(both, HFTokenizer) and both.n_vocab <= 300
    assert isinstance(load_tokenizer(llama_dir / "tokenizer.json"), HFTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="looked for tokenizer.json, tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")


def test_bad_tokenizer_model_files(tmp_path):
    sentencepiece = tmp_path / "sp" / "tokenizer.model"
    sentencepiece.parent.mkdir()
    sentencepiece.write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0b")
    with pytest.raises(TokenizerError, match="not a tiktoken BPE file"):
        load_tokenizer(sentencepiece.parent)
    no_newline = write_tiktoken_file(tmp_path / "b" / "tokenizer.model", [bytes([b]) for b in range(256) if b != 10])
    gap = tmp_path / "c" / "tokenizer.model"
    write_tiktoken_file(gap, [bytes([b]) for b in range(256)])
    gap.write_text(gap.read_text() + f"{base64.b64encode(b'ab').decode()} 300\n")
    with pytest.raises(TokenizerError, match="ranks are not"):
        load_tiktoken_model(gap)
    with pytest.raises(TokenizerError, match=r"single bytes \[10\] have no token"):
        load_tiktoken_model(no_newline)


def test_check_vocab_size(llama_dir):
    gpt2 = get_tokenizer()
    check_vocab_size(gpt2, 50257)
    with pytest.raises(TokenizerError, match="has 50257 tokens but the model's vocab_size is 4096; "
                                             "the model was trained with a different tokenizer"):
        check_vocab_size(gpt2, 4096)
    with pytest.raises(TokenizerError):
        check_vocab_size(gpt2, 50304)  # a padded model is accepted only when asked for
    check_vocab_size(gpt2, 50304, padded=True)
    with pytest.raises(TokenizerError, match="has 50257 tokens"):
        check_vocab_size(gpt2, 50000, padded=True)  # fewer rows than tokens: never
    llama = load_tokenizer(llama_dir)
    check_vocab_size(llama, N_BASE + 256)
    assert str(N_BASE + 256) in str(pytest.raises(TokenizerError, check_vocab_size, llama, 128256).value)


def test_a_checkpoint_carries_its_tokenizer(llama_dir, tmp_path):
    gpt2 = get_tokenizer()
    assert save_tokenizer(gpt2, tmp_path / "run0") == {"name": "gpt2", "n_vocab": 50257}
    assert not (tmp_path / "run0").exists()  # GPT-2's needs no file
    assert load_saved_tokenizer(tmp_path / "run0", None) is gpt2  # older checkpoints: no record
    assert load_saved_tokenizer(tmp_path / "run0", "gpt2") is gpt2
    trained = train_bpe("the cat sat on the mat, the dog sat on the log " * 10, 300)
    for tok, file in ((trained, "tokenizer.json"), (load_tokenizer(llama_dir), "tokenizer.model")):
        run = tmp_path / file.replace(".", "_")
        record = save_tokenizer(tok, run)
        assert record["file"] == file and (run / file).is_file() and len(record["sha256"]) == 64
        back = load_saved_tokenizer(run, record)
        assert back.n_vocab == tok.n_vocab and back.encode("the cat 1212") == tok.encode("the cat 1212")
        assert tokenizer_record(back) == record
    record = save_tokenizer(trained, tmp_path / "run1")
    with pytest.raises(TokenizerError, match="trained with a tokenizer of 50257 tokens"):
        check_same_tokenizer(trained, {"name": "gpt2", "n_vocab": 50257}, "run1")
    other = train_bpe("a completely different text, with other pairs in it " * 10, trained.n_vocab)
    assert other.n_vocab == trained.n_vocab
    with pytest.raises(TokenizerError, match="a different one of the same size"):
        check_same_tokenizer(other, record, "run1")
    other.save(tmp_path / "run1")  # the file beside the checkpoint replaced by another
    with pytest.raises(TokenizerError, match="different one of the same size"):
        load_saved_tokenizer(tmp_path / "run1", record)
    (tmp_path / "run1" / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="saved beside it as tokenizer.json, which is missing"):
        load_saved_tokenizer(tmp_path / "run1", record)
