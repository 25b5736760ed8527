"""Prompts in the model's format (finetune.prompts): the book's Alpaca text for GPT-2, the chat
template for Llama 3 and Qwen3, chosen by family or by --prompt-style; the loss mask on the
response either way."""

import json

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, LlamaConfig, LlamaModel
from numpygpt.cli import main
from numpygpt.finetune.dpo_data import PreferenceDataset
from numpygpt.finetune.instruct_data import InstructionDataset, collate_instructions, format_example, format_input
from numpygpt.finetune.prompts import AlpacaPrompts, ChatPrompts, default_prompt_style, prompt_format
from numpygpt.tokenizer import get_tokenizer

from test_llama_finetune import instruction_file, save_tiny, tiny_tokenizer

ENTRY = {"instruction": "What is two plus three?", "input": "", "output": "Five."}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def llama(family="llama"):
    return LlamaModel(LlamaConfig.preset(f"{family}-tiny", vocab_size=512), seed=0)


def test_the_default_follows_the_family():
    assert default_prompt_style(GPTModel(GPTConfig.preset("tiny"))) == "alpaca"
    assert default_prompt_style(llama("llama")) == default_prompt_style(llama("qwen3")) == "chat"


def test_a_tokenizer_without_the_templates_stop_token_defaults_to_alpaca():
    """A Llama trained from scratch on a BPE of its corpus has no chat tokens: the default
    falls back to the Alpaca prompt rather than refusing (asked for, chat still refuses)."""
    from numpygpt.tokenizer import train_bpe

    tokenizer = train_bpe("plain text with no special tokens at all " * 20, 300)
    model = llama("qwen3")
    assert default_prompt_style(model, tokenizer) == "alpaca"
    assert isinstance(prompt_format(model, tokenizer), AlpacaPrompts)
    with pytest.raises(ValueError, match="im_end"):
        prompt_format(model, tokenizer, "chat")


def test_alpaca_is_the_books_text_and_mask():
    tok = get_tokenizer()
    prompts = prompt_format(GPTModel(GPTConfig.preset("tiny")), tok)
    assert isinstance(prompts, AlpacaPrompts) and prompts.stop_id == prompts.pad_id == 50256
    ids, prompt_length = prompts.tokenize(ENTRY)
    assert ids == tok.encode(format_example(ENTRY)) and prompt_length == len(tok.encode(format_input(ENTRY)))
    assert prompts.extract(" ### Response:\nFive. ") == "Five."


@pytest.mark.parametrize("family, prompt_text, stop", [
    ("llama", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is two plus three?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ("qwen3", "<|im_start|>user\nWhat is two plus three?<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
])
def test_chat_is_the_template_with_the_mask_on_the_response(tokenizer, family, prompt_text, stop):
    prompts = prompt_format(llama(family), tokenizer)
    assert isinstance(prompts, ChatPrompts) and prompts.prompt(ENTRY) == prompt_text
    assert prompts.stop_id == prompts.pad_id == tokenizer.token_id(stop)
    ids, P = prompts.tokenize(ENTRY)
    assert tokenizer.decode(ids[:P]) == prompt_text and tokenizer.decode(ids[P:]) == "Five."
    # the collate appends the stop token; with the instruction masked only "Five." and the stop are targets
    dataset = InstructionDataset([ENTRY], max_length=100, prompts=prompts)
    inputs, targets = collate_instructions([dataset[0]], pad_id=prompts.pad_id, mask_instruction=True)
    kept = targets[0][targets[0] != -100].tolist()
    assert tokenizer.decode(kept) == "Five." + stop
    with_input = prompts.prompt({**ENTRY, "input": "Use digits."})
    assert "What is two plus three?\n\nUse digits." in with_input
    assert prompts.extract(" Five. " + stop + "junk") == "Five."


def test_a_dpo_response_ends_with_the_stop_token(tokenizer):
    prompts = prompt_format(llama("qwen3"), tokenizer)
    entry = {**ENTRY, "chosen": "Five, thank you.", "rejected": "5"}
    pair = PreferenceDataset([entry], prompts=prompts)[0]
    assert pair.prompt_length == len(prompts.encode(prompts.prompt(entry)))
    assert tokenizer.decode(pair.chosen[pair.prompt_length:].tolist()) == "Five, thank you.<|im_end|>"
    assert pair.rejected[-1] == prompts.stop_id


def test_chat_needs_a_template_and_its_tokens(tokenizer):
    with pytest.raises(ValueError, match="a gpt2 model has no chat template"):
        prompt_format(GPTModel(GPTConfig.preset("tiny")), get_tokenizer(), "chat")
    with pytest.raises(ValueError, match="has no <|eot_id|> token.*--prompt-style alpaca"):
        prompt_format(llama(), get_tokenizer())  # GPT-2's tokenizer has no chat tokens
    assert isinstance(prompt_format(llama(), get_tokenizer(), "alpaca"), AlpacaPrompts)
    with pytest.raises(ValueError, match="--prompt-style must be one of alpaca, chat"):
        prompt_format(llama(), tokenizer, "chatml")


def test_prompt_style_alpaca_on_a_llama_and_chat_reads_it_back(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "llama", "llama", tiny_tokenizer())
    out = tmp_path / "out"
    assert main(["finetune", "instruct", "--pretrained", str(model_dir), "--data", str(instruction_file(tmp_path)),
                 "--out", str(out), "--batch-size", "4", "--epochs", "6", "--lr", "5e-3", "--eval-freq", "20", "--mask-instruction",
                 "--eval-iter", "1", "--max-new-tokens", "16", "--prompt-style", "alpaca", "--device", "cpu",
                 "--no-progress"]) == 0
    assert "prompts alpaca" in capsys.readouterr().out
    responses = json.loads((out / "test-responses.json").read_text())
    assert sum(r["model_response"] == r["output"] for r in responses) >= len(responses) - 1, responses
    args = ["chat", "--model", str(out / "model"), "--device", "cpu", "--max-new-tokens", "16", "Give the opposite of hot."]
    assert main(args + ["--prompt-style", "alpaca"]) == 0
    assert capsys.readouterr().out.strip() == "Cold."
    assert main(args) == 0  # the family's default, the chat template: not what this model learned
    assert capsys.readouterr().out.strip() != "Cold."
