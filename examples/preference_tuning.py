"""Tune an instruction-following GPT-2 to preferences with DPO: the book's chapter 7 follow-up.

    # 1. instruction fine-tuning (the book's chapter 7) gives the model to align
    numpygpt finetune instruct --pretrained gpt2-medium --out runs/instruct
    # 2. preference pairs from a local model (ollama serve; ollama pull llama3), then DPO
    python examples/preference_tuning.py --model runs/instruct/model --instructions instruction-data.json
    # or, with a preference file already made
    python examples/preference_tuning.py --model runs/instruct/model --data instruction-data-preferences.json

With --instructions the script first asks the judge model (--judge-model, --judge-url) to
rewrite each output a little more or a little less politely (`numpygpt make-preferences`),
writing FILE-preferences.json, then tunes on it. Every option of `numpygpt finetune dpo` works
here (see --help): the book's recipe by default (beta 0.1, AdamW 5e-6 with weight decay 0.01,
one epoch of batch 8). It writes the tuned model, loss.png, margins.png and history.json into
runs/dpo, and prints the rewards, the margin and the reward accuracy as it trains.
"""

import argparse
import os
import sys

# run from a checkout without installing: make the repository importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numpygpt.cli import main as numpygpt_main, run_cli, run_finetune_dpo  # noqa: E402
from numpygpt.finetune.dpo_recipe import add_dpo_args  # noqa: E402
from numpygpt.finetune.judge import DEFAULT_JUDGE_URL  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    making = parser.add_argument_group("making the preference data first (instead of --data)")
    making.add_argument("--instructions", metavar="JSON", help="instruction data {instruction, input, output}")
    making.add_argument("--judge-model", default="llama3", help="(default llama3)")
    making.add_argument("--judge-url", default=DEFAULT_JUDGE_URL, help=f"(default {DEFAULT_JUDGE_URL})")
    add_dpo_args(parser)
    given = vars(parser.parse_args(argv))
    instructions = given.pop("instructions", None)
    judge_model, judge_url = given.pop("judge_model", "llama3"), given.pop("judge_url", DEFAULT_JUDGE_URL)
    if instructions is not None:  # numpygpt make-preferences, then tune on what it wrote
        stem, ext = os.path.splitext(instructions)
        given["data"] = stem + "-preferences" + (ext or ".json")
        rc = numpygpt_main(["make-preferences", instructions, "--out", given["data"], "--judge-model", judge_model,
                            "--judge-url", judge_url] + (["--no-progress"] if given.get("no_progress") else []))
        if rc != 0:
            return rc
    return run_cli(lambda: run_finetune_dpo(given))


if __name__ == "__main__":
    sys.exit(main())
