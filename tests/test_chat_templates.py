"""Chat templates: the exact text of Llama 3's and Qwen3's templates, and their ids."""

import base64

import pytest
from tokenizers import AddedToken

from numpygpt.tokenizer import (HFTokenizer, chat_template, encode_chat, llama3_chat, load_tiktoken_model,
                                qwen3_chat, train_bpe)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_llama3_text():
    assert llama3_chat(MESSAGES) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"  # content is trimmed
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert llama3_chat(MESSAGES[:1], add_generation_prompt=False).endswith("Be brief.<|eot_id|>")


def test_qwen3_text():
    assert qwen3_chat(MESSAGES[1:2]) == "<|im_start|>user\n  What is 2+2?\n<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3_chat(MESSAGES[:1], add_generation_prompt=False) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert qwen3_chat(MESSAGES[1:2], thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_llama3_ids(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = load_tiktoken_model(path)
    ids = encode_chat(tok, [{"role": "user", "content": "hi"}], "llama")
    header, end_header, eot = (tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert ids == ([256, header] + list(b"user") + [end_header] + list(b"\n\nhi") + [eot, header]
                   + list(b"assistant") + [end_header] + list(b"\n\n"))
    assert chat_template("llama").stop == "<|eot_id|>"


def test_qwen3_ids():
    tok = train_bpe("user assistant hi", 300)
    tok.hf_tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                         for t in ("<|im_start|>", "<|im_end|>")])
    tok = HFTokenizer(tok.hf_tokenizer)
    ids = encode_chat(tok, [{"role": "user", "content": "hi"}], "qwen3")
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert ids.count(start) == 2 and ids.count(end) == 1 and ids[0] == start
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_template("qwen3").stop == "<|im_end|>"


def test_bad_messages():
    with pytest.raises(ValueError, match="at least one message"):
        llama3_chat([])
    with pytest.raises(ValueError, match="message 1"):
        qwen3_chat([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ValueError, match="message 0"):
        qwen3_chat([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="no chat template for model_type 'gpt2'"):
        chat_template("gpt2")
