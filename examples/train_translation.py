"""Train the original Transformer to translate numbers between words and digits.

    python examples/train_translation.py                 # 100% held out; 1-3 min on 2 loaded cores
    python examples/train_translation.py --post-norm     # the paper's post-LayerNorm blocks
    numpygpt train-translation --help                    # the same command

"three hundred and twelve" -> "312" and back, for numbers from 0 to 999,999 drawn from a seed
(nothing is downloaded): 20,000 numbers train, both directions, and 500 others are held out.
An encoder-decoder of 2 + 2 pre-LayerNorm blocks (emb 64, 4 heads, 237k parameters) trains
with AdamW in numpygpt's one loop (``train_model`` with a ``TranslationObjective``); then
greedy decoding with the KV caches translates the held-out numbers and the script prints
the exact-match accuracy and a few translations. See docs/translation.md.
"""

import os
import sys

# run from a checkout without installing: make the repository importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numpygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-translation"] + sys.argv[1:]))
