"""Train a small GPT from scratch, on CPU in a few minutes.

    python examples/train_gpt.py                  # Python's reference manual, 400 steps
    python examples/train_gpt.py --greedy         # the same, with greedy samples
    python examples/train_gpt.py --data book.txt --max-steps 1000 --prompt "Once upon a time"
    python examples/train_gpt.py --resume runs/train/checkpoint.safetensors --max-steps 600

With no arguments this builds a 4-layer GPT (emb 128, 4 heads, context 128, output head
tied to the token embedding) and trains it for 400 AdamW steps (peak lr 3e-3, warmup +
cosine) on the text of Python's own reference manual (shipped with CPython in
pydoc_data: nothing to download), with its indentation and hard line wraps tidied away
(``numpygpt.data.tidy_text``). It prints the training and validation losses, a
sample after each epoch, drawn at temperature 0.8 from the 40 most likely tokens with
seed 123 (the settings are printed with it; --greedy decodes greedily), and writes a
checkpoint, a loss plot and the loss history into runs/train. Every option of
`numpygpt train` works here (see --help): this script is that command.

Then continue some text with the trained model (the run prints this command line):

    python examples/generate.py --checkpoint runs/train/checkpoint.safetensors \\
        --prompt "The for statement is used to"
"""

import os
import sys

# run from a checkout without installing: make the repository importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numpygpt.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(description=__doc__.split("\n\n")[0])
