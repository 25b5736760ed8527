"""``numpygpt tokenizer train``: train a byte-level BPE tokenizer on a text file.

    numpygpt tokenizer train --data book.txt --vocab-size 4096 --out runs/tokenizer

writes ``runs/tokenizer/tokenizer.json``, which ``numpygpt.tokenizer.load_tokenizer``
(and ``numpygpt train --tokenizer DIR``) reads back. Without ``--data`` it trains on the
default corpus, Python's reference manual as ``numpygpt train`` reads it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass


@dataclass
class TokenizerTrainOptions:
    data: str | None = None    # a UTF-8 text file; None: the default corpus
    vocab_size: int = 4096     # tokens in all: 256 bytes, the merges and <|endoftext|>
    out: str = "runs/tokenizer"  # the directory that gets tokenizer.json


def _vocab_size(s: str) -> int:
    from .hf import N_BYTES

    v = int(s)
    if v < N_BYTES + 1:
        raise argparse.ArgumentTypeError(f"must be at least {N_BYTES + 1} (the 256 bytes and <|endoftext|>), got {s}")
    return v


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    """``tokenizer train`` and its options, defaults from TokenizerTrainOptions."""
    defaults = TokenizerTrainOptions()
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="{train}", required=True)
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer on a text",
                               description=__doc__.split("\n\n")[0])
    train.add_argument("--data", metavar="FILE", default=defaults.data,
                       help="UTF-8 text file to train on (default: Python's reference manual from pydoc_data)")
    train.add_argument("--vocab-size", type=_vocab_size, metavar="N", default=defaults.vocab_size,
                       help=f"tokens in the vocabulary, <|endoftext|> included (default {defaults.vocab_size})")
    train.add_argument("--out", metavar="DIR", default=defaults.out,
                       help=f"directory to write tokenizer.json into (default {defaults.out})")


def run_tokenizer_train(options, say=print):
    """Train, save and describe a tokenizer; ``options`` is a TokenizerTrainOptions, an
    argparse Namespace or a dict with its fields. Returns the tokenizer."""
    from ..data import default_corpus, load_text
    from .gpt2 import get_tokenizer
    from .hf import train_bpe

    if isinstance(options, argparse.Namespace):
        options = vars(options)
    if isinstance(options, dict):
        options = TokenizerTrainOptions(**{k: v for k, v in options.items() if k in asdict(TokenizerTrainOptions())})
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
