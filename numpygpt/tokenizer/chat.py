"""Chat templates: a list of messages as the text an instruction-tuned model was trained on.

A message is ``{"role": "system" | "user" | "assistant", "content": str}``. Each format
function returns text with the model's special tokens spelled out; encode it with
``allowed_special="all"`` (``encode_chat`` does) so they become single ids. With
``add_generation_prompt`` the text ends where the assistant's answer begins, and the
model's answer ends with the template's ``stop`` token::

    llama3_chat([{"role": "user", "content": "Hi"}])
    # '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>'
    # '<|start_header_id|>assistant<|end_header_id|>\\n\\n'

These are the templates' plain-conversation paths, no tools or images. Llama 3.1/3.2's
template also writes a system header with a knowledge cut-off and today's date when no
system message is given; pass your own system message if the model expects one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ROLES = ("system", "user", "assistant")


def _check_messages(messages) -> None:
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")


def llama3_chat(messages, add_generation_prompt: bool = True) -> str:
    """Llama 3's template: each turn between header tokens, content trimmed, ended by ``<|eot_id|>``."""
    _check_messages(messages)
    text = "<|begin_of_text|>"
    for message in messages:
        text += (f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
                 f"{message['content'].strip()}<|eot_id|>")
    if add_generation_prompt:
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return text


def qwen3_chat(messages, add_generation_prompt: bool = True, thinking: bool = True) -> str:
    """Qwen3's ChatML template: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn.

    ``thinking=False`` is Qwen3's ``enable_thinking=False``: the answer starts after an
    empty ``<think></think>`` block, so the model answers without reasoning first.
    """
    _check_messages(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n")
    return text


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    format: Callable  # (messages, add_generation_prompt=True) -> str
    stop: str         # the special token that ends an assistant turn


CHAT_TEMPLATES = {
    "llama": ChatTemplate("llama3", llama3_chat, "<|eot_id|>"),
    "qwen3": ChatTemplate("qwen3", qwen3_chat, "<|im_end|>"),
}


def chat_template(model_type: str) -> ChatTemplate:
    """The chat template of a ``config.json`` ``model_type`` (``llama`` or ``qwen3``)."""
    if model_type not in CHAT_TEMPLATES:
        raise ValueError(f"no chat template for model_type {model_type!r}; known: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[model_type]


def encode_chat(tokenizer, messages, model_type: str, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` in ``model_type``'s template (special tokens as their ids)."""
    template = chat_template(model_type)
    return tokenizer.encode(template.format(messages, add_generation_prompt), allowed_special="all")
