"""``numpygpt tokenizer train``: train a byte-level BPE tokenizer on a text file.

    numpygpt tokenizer train --data book.txt --vocab-size 4096 --out runs/tokenizer

writes ``runs/tokenizer/tokenizer.json``, which ``numpygpt.tokenizer.load_tokenizer``
(and ``numpygpt train --tokenizer DIR``) reads back. Without ``--data`` it trains on the
default corpus, Python's reference manual as ``numpygpt train`` reads it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from ..options import Check, Options, add_arguments, option

VOCAB_SIZE = Check(int, lambda v: v >= 257, "must be at least 257 (the 256 bytes and <|endoftext|>), got {}")


@dataclass
class TokenizerTrainOptions(Options):
    """``numpygpt tokenizer train``'s options (each a flag, with its default)."""

    data: str | None = option(None, "UTF-8 text file to train on (default: Python's reference manual from "
                              "pydoc_data, as numpygpt train reads it)", metavar="FILE")
    vocab_size: int = option(4096, "tokens in the vocabulary: the 256 bytes, the merges and <|endoftext|>",
                             check=VOCAB_SIZE, metavar="N")
    out: str = option("runs/tokenizer", "directory to write tokenizer.json into", metavar="DIR")


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    """``tokenizer train`` and its flags (from TokenizerTrainOptions)."""
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="{train}", required=True)
    add_arguments(actions.add_parser("train", help="train a byte-level BPE tokenizer on a text",
                                     description=__doc__.split("\n\n")[0]), TokenizerTrainOptions)


def run_tokenizer_train(options, say=print):
    """Train, save and describe a tokenizer; ``options`` is a TokenizerTrainOptions, an
    argparse Namespace or a dict with its fields. Returns the tokenizer."""
    from ..data import default_corpus, load_text
    from .gpt2 import get_tokenizer
    from .hf import train_bpe

    if isinstance(options, argparse.Namespace):
        options = {k: v for k, v in vars(options).items() if k not in ("command", "tokenizer_command")}
    if isinstance(options, dict):
        options = TokenizerTrainOptions.from_dict(options)
    options.validate()
    text = default_corpus() if options.data is None else load_text(options.data)
    source = options.data or "the default corpus (Python's reference manual)"
    start = time.perf_counter()
    tokenizer = train_bpe(text, options.vocab_size)
    seconds = time.perf_counter() - start
    path = tokenizer.save(options.out)
    n_tokens, n_gpt2 = len(tokenizer.encode_ordinary(text)), len(get_tokenizer().encode_ordinary(text))
    say(f"trained a {tokenizer.n_vocab:,}-token byte-level BPE on {source} ({len(text):,} characters) "
        f"in {seconds:.1f} s")
    if tokenizer.n_vocab < options.vocab_size:
        say(f"the text has too few distinct pairs for {options.vocab_size:,} tokens: stopped at {tokenizer.n_vocab:,}")
    say(f"{len(text) / max(n_tokens, 1):.2f} characters a token on this text (GPT-2's vocabulary: "
        f"{len(text) / max(n_gpt2, 1):.2f}); wrote {path}")
    return tokenizer
