"""Bits per character: a loss that compares models with different vocabularies.

A loss of L nats per token says little across tokenizers: a 2,000-token vocabulary cuts
a text into more, easier tokens than GPT-2's 50,257. What is comparable is the cost of
the text itself. Over a text of C characters cut into N tokens, the model spends
L * N nats in all, so

    bits per character = L * N / C / ln 2

(``/ ln 2`` turns nats into bits). Characters are Python ``str`` characters (Unicode
code points), counted the same way whatever the tokenizer.
"""

from __future__ import annotations

import math


def bits_per_character(loss: float, n_tokens: int, n_characters: int) -> float:
    """``loss`` (mean nats per token over ``n_tokens`` tokens) as bits per character of a
    text of ``n_characters`` characters."""
    if n_tokens < 0 or n_characters <= 0:
        raise ValueError(f"need n_tokens >= 0 and n_characters > 0, got {n_tokens} and {n_characters}")
    return float(loss) * n_tokens / n_characters / math.log(2)


def text_bits_per_character(loss: float, tokenizer, text: str) -> float:
    """Bits per character of ``text`` for a model whose mean loss on it is ``loss`` nats per
    token, counting the tokens as ``tokenizer`` cuts ``text``."""
    return bits_per_character(loss, len(tokenizer.encode_ordinary(text)), len(text))
