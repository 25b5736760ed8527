"""How an instruction entry becomes token ids: the book's Alpaca format, or the model's chat
template (Llama 3's header tokens, Qwen3's ``<|im_start|>``), for training, DPO and answers.

    prompts = prompt_format(model, tokenizer)            # by family: chat for Llama 3 / Qwen3
    prompts = prompt_format(model, tokenizer, "alpaca")  # the book's, for any model
    ids, prompt_length = prompts.tokenize(entry)          # a training text and where its response starts
    prompt_ids = prompts.encode(prompts.prompt(entry))    # what the model continues; it stops at prompts.stop_id

With ``alpaca`` (GPT-2's default) everything is as in the book's chapter 7: the text is
``format_example``, the prompt ``format_input``, the end of an answer ``<|endoftext|>``. With
``chat`` the entry is one user turn (the instruction, then its input after a blank line) and
the answer is the assistant's turn: the prompt is the template's text up to where the
assistant's answer begins, the response is followed by the template's stop token
(``<|eot_id|>``, ``<|im_end|>``: ``pad_id``, which instruct's collate appends to every text
and pads with), which is also where generation stops. The prompt and the response are
tokenised apart and joined, so the loss mask's boundary is exact.
"""

from __future__ import annotations

from ..tokenizer.chat import CHAT_TEMPLATES, chat_template
from .instruct_data import RESPONSE_HEADER, extract_response, format_input, tokenize_example

__all__ = ["PROMPT_STYLES", "AlpacaPrompts", "ChatPrompts", "prompt_format", "default_prompt_style"]

PROMPT_STYLES = ("alpaca", "chat")


class AlpacaPrompts:
    """The book's format: "Below is an instruction ... ### Instruction: ... ### Response:"."""

    name = "alpaca"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_id = tokenizer.eot_token  # an answer ends with <|endoftext|>
        self.pad_id = self.stop_id  # instruct's collate appends it to every text: the answer's end

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prompt(self, entry: dict) -> str:
        """What the model continues to answer (the book's ``format_input``)."""
        return format_input(entry)

    def tokenize(self, entry: dict) -> tuple[list[int], int]:
        """(ids of the whole training text, how many of them are the prompt), as the book's
        ``InstructionDataset`` (and exercise 7.2's mask) tokenises them."""
        return tokenize_example(self.tokenizer, entry)

    def response_prompt(self, entry: dict) -> list[int]:
        """The ids a DPO response follows: the prompt and the response header."""
        return self.encode(format_input(entry) + RESPONSE_HEADER)

    def response(self, text: str) -> list[int]:
        return self.encode(text)

    def extract(self, continuation: str) -> str:
        """The response in a generated continuation, as the book cuts it out."""
        return extract_response(continuation)


class ChatPrompts:
    """The model's chat template (``numpygpt.tokenizer.chat``): one user turn, the assistant's answer."""

    name = "chat"

    def __init__(self, tokenizer, model_type: str):
        self.tokenizer, self.template = tokenizer, chat_template(model_type)
        self.stop_id = _stop_id(tokenizer, self.template)
        self.pad_id = self.stop_id
        if self.stop_id is None:
            raise ValueError(f"--prompt-style chat: tokenizer {tokenizer.name!r} has no {self.template.stop} token, "
                             f"which ends an answer in {model_type}'s chat template; use --prompt-style alpaca")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all")

    def prompt(self, entry: dict) -> str:
        content = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
        return self.template.format([{"role": "user", "content": content}], add_generation_prompt=True)

    def tokenize(self, entry: dict) -> tuple[list[int], int]:
        """The prompt's ids and the response's; the collate appends ``stop_id`` (``pad_id``)."""
        prompt = self.encode(self.prompt(entry))
        return prompt + self.encode(entry["output"]), len(prompt)

    def response_prompt(self, entry: dict) -> list[int]:
        return self.encode(self.prompt(entry))

    def response(self, text: str) -> list[int]:
        """A DPO response's ids, ended by the template's stop token."""
        return self.encode(text) + [self.stop_id]

    def extract(self, continuation: str) -> str:
        return continuation.split(self.template.stop)[0].strip()


def default_prompt_style(model, tokenizer=None) -> str:
    """``chat`` for a family with a chat template (Llama 3, Qwen3), ``alpaca`` for GPT-2 and
    for a model whose ``tokenizer`` lacks the template's stop token (a Llama trained from
    scratch with a BPE of its own corpus has no chat tokens)."""
    if model.cfg.model_type not in CHAT_TEMPLATES:
        return "alpaca"
    has_lookup = getattr(tokenizer, "token_id", None) is not None  # GPT-2's has none: chat then refuses it
    if has_lookup and _stop_id(tokenizer, chat_template(model.cfg.model_type)) is None:
        return "alpaca"
    return "chat"


def _stop_id(tokenizer, template) -> int | None:
    """The id of the template's stop token in ``tokenizer``, or None where it has none (a
    tokenizer without special-token lookup, or one trained without the chat tokens)."""
    token_id = getattr(tokenizer, "token_id", None)
    if token_id is None:
        return None
    try:
        return token_id(template.stop)
    except ValueError:
        return None


def prompt_format(model, tokenizer, style: str | None = None):
    """The prompts of ``style`` (None: the family's default) for ``model`` and its tokenizer."""
    style = style or default_prompt_style(model, tokenizer)
    if style not in PROMPT_STYLES:
        raise ValueError(f"--prompt-style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if style == "alpaca":
        return AlpacaPrompts(tokenizer)
    if model.cfg.model_type not in CHAT_TEMPLATES:
        raise ValueError(f"--prompt-style chat: a {model.cfg.model_type} model has no chat template "
                         f"(numpygpt has {', '.join(sorted(CHAT_TEMPLATES))}'s); use --prompt-style alpaca")
    return ChatPrompts(tokenizer, model.cfg.model_type)
