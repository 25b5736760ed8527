"""Continue a prompt with a trained checkpoint or with OpenAI's GPT-2 weights.

    python examples/generate.py --checkpoint runs/train/checkpoint.safetensors \\
        --prompt "The for statement is used to" --max-new-tokens 40
    python examples/generate.py --model gpt2 --prompt "Every effort moves you" \\
        --temperature 0.8 --top-k 40 --seed 1

--checkpoint reads a file written by `numpygpt train` (examples/train_gpt.py);
--model reads GPT-2 in the Hugging Face layout (config.json + model.safetensors) from a
directory, or fetches it by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl). Temperature 0
(the default) always takes the most likely token; a positive temperature samples, with
--top-k / --top-p to cut the unlikely tail and --seed to make it repeatable. This script
is `numpygpt generate` (see --help).
"""

import os
import sys

# run from a checkout without installing: make the repository importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numpygpt.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    generate_main(description=__doc__.split("\n\n")[0])
