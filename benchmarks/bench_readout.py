"""Classification readout: test accuracy of readout="last" (the book: the logits of the last
position, which is padding for every text shorter than the longest) against
readout="last_non_pad" (each text's own last token), on the generated two-class data the
tests train on, over several seeds.

    python benchmarks/bench_readout.py                       # seeds 123..127, last block and head only
    python benchmarks/bench_readout.py --seeds 123 124 --trainable last-block

The data: 400 messages of 3 to 8 words, words about fruit labelled ham and words about
space labelled spam (240 ham, 160 spam; balanced to 160 each, so 224 train, 32 validation
and 64 test texts), padded with <|endoftext|> to the longest training text. The model: a
GPT-2-shaped 2-block, C=32 model with random weights (no pretraining: no download), saved
as a pretrained directory; then ``numpygpt finetune classify`` with lr 2e-3, 5 epochs,
batch 8, the seed drawing the head, the balancing, the split and the batch order.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from numpygpt import GPTConfig, GPTModel
from numpygpt.finetune.classify import finetune_classifier

WORDS = {"ham": "apple banana cherry grape lemon mango melon peach pear plum".split(),
         "spam": "rocket planet galaxy comet orbit star moon nebula quasar meteor".split()}


def write_messages(path: Path, n: int = 400, seed: int = 0) -> Path:
    """n label<TAB>text lines: two in five spam, each 3 to 8 words of its class."""
    rng = np.random.default_rng(seed)
    labels = ["spam" if i % 5 in (1, 3) else "ham" for i in range(n)]
    lines = [f"{label}\t{' '.join(rng.choice(WORDS[label], rng.integers(3, 9)))}" for label in labels]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_pretrained(directory: Path) -> Path:
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                    drop_rate=0.1, qkv_bias=True, tie_weights=True)
    GPTModel(cfg, seed=1).save_pretrained(directory)
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[123, 124, 125, 126, 127])
    parser.add_argument("--trainable", nargs="+", default=["last-block", "head"])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, pretrained = write_messages(tmp / "messages.txt"), tiny_pretrained(tmp / "tiny-gpt2")
        print("| trainable | readout | test accuracy per seed | mean |")
        print("|---|---|---|---|")
        for trainable in args.trainable:
            for readout in ("last", "last_non_pad"):
                accs = [finetune_classifier(data=str(data), pretrained=str(pretrained), out=str(tmp / "out"),
                                            device="cpu", no_progress=True, lr=2e-3, epochs=args.epochs,
                                            eval_freq=1000, readout=readout, trainable=trainable, seed=seed,
                                            log=lambda *a: None)["accuracy"]["test"] for seed in args.seeds]
                print(f"| {trainable} | {readout} | {', '.join(f'{a * 100:.1f}' for a in accs)} | "
                      f"{np.mean(accs) * 100:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
