"""Continue a prompt with a trained checkpoint or with OpenAI's GPT-2 weights.

    python examples/generate.py --checkpoint runs/train/checkpoint.safetensors
    python examples/generate.py --checkpoint runs/train/checkpoint.safetensors --greedy
    python examples/generate.py --model gpt2 --prompt "Every effort moves you" \\
        --temperature 1.0 --top-k 50 --seed 1

--checkpoint reads a file written by `numpygpt train` (examples/train_gpt.py);
--model reads GPT-2 in the Hugging Face layout (config.json + model.safetensors) from a
directory, or fetches it by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl). By default it
samples at temperature 0.8 from the 40 most likely tokens with seed 123, so the same
command prints the same text, and says so on stderr; --temperature, --top-k, --top-p and
--seed change that, and --greedy (or --temperature 0) always takes the most likely token,
which a small model soon repeats in a loop. The prompt defaults to "The for statement is
used to" for a checkpoint trained on the default corpus. This script is
`numpygpt generate` (see --help).
"""

import os
import sys

# run from a checkout without installing: make the repository importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numpygpt.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    generate_main(description=__doc__.split("\n\n")[0])
