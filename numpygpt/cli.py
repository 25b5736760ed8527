"""The ``numpygpt`` command (also ``python -m numpygpt``)::

    numpygpt train                      # a small GPT on Python's reference manual, a few minutes on CPU
    numpygpt train --data book.txt --preset gpt2-small --context-length 256 --max-steps 500
    numpygpt train --resume runs/train/checkpoint.safetensors --max-steps 400
    numpygpt generate --checkpoint runs/train/checkpoint.safetensors --prompt "The for statement"
    numpygpt generate --model gpt2 --prompt "Every effort moves you" --temperature 0.8 --top-k 40
    numpygpt make-preferences instruction-data.json --judge-model llama3   # DPO pairs from a local model
    numpygpt finetune dpo --model runs/instruct/model --data instruction-data-preferences.json
    numpygpt tokenizer train --data book.txt --vocab-size 4096 --out runs/tokenizer
    numpygpt train --data book.txt --tokenizer runs/tokenizer
    numpygpt gradcheck                  # finite-difference check of every layer's backward
    numpygpt walkthrough                # one backward pass of a tiny GPT, op by op (docs/backward.md)

This module parses arguments and turns errors into exit codes; what the commands do is
``numpygpt.run`` (``run_training``, ``run_generate``, ``run_gradcheck``), callable from
Python with the same names. ``examples/train_gpt.py`` and ``examples/generate.py`` run the same code
(``train_main`` and ``generate_main``). Mistakes in the arguments are argparse usage
errors; a missing file, a text too short for one window, an unreadable checkpoint or an
unavailable device is one line on stderr and exit code 2; a diverged run exits with 1.
"""

from __future__ import annotations

import argparse
import math
import sys

from .options import add_arguments
from .tokenizer.command import add_tokenizer_args, run_tokenizer_train
from .run import (DEFAULT_PROMPT, GENERIC_PROMPT, TRAIN_DEFAULTS, RunError, TrainCommandOptions, load_model,
                  run_generate, run_gradcheck, run_training)

__all__ = ["main", "train_main", "generate_main", "parse_train_args", "run_training", "run_generate", "run_cli",
           "CLIError", "RunError", "TRAIN_DEFAULTS"]


CLIError = RunError  # the one-line, exit-code-2 error (its old name)


# -- train: options ---------------------------------------------------------------------------

def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not (math.isfinite(v) and v >= 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {s}")
    return v


def _drop_rate(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _add_sampling_args(p) -> None:
    from .generate import SAMPLING_DEFAULTS as S

    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--temperature", type=_nonneg_float, help=f"sampling temperature, 0 is greedy (default {S['temperature']})")
    p.add_argument("--top-k", type=_positive_int, help=f"sample only from the k most likely tokens (default {S['top_k']})")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag of TrainCommandOptions, defaulting to "not given" (SUPPRESS): its defaults
    fill the gaps later, after a resumed checkpoint's own options, so --resume continues a
    run with the settings it was started with unless told otherwise."""
    add_arguments(p, TrainCommandOptions, suppress=True)


def build_train_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description or "Train a GPT model.",
                                argument_default=argparse.SUPPRESS)
    _add_train_args(p)
    return p


def parse_train_args(argv) -> dict:
    """The options given on the command line (only those), as a dict."""
    return vars(build_train_parser().parse_args(argv))


# -- generate -------------------------------------------------------------------------------------

def _add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by `numpygpt train`")
    src.add_argument("--model", metavar="DIR_OR_NAME",
                     help="a model of any family with its own tokenizer: a Hugging Face directory (gpt2, llama, "
                          "qwen3; its tokenizer.json or tokenizer.model), a numpygpt run folder or checkpoint, or "
                          "gpt2 / gpt2-medium / ...")
    p.add_argument("--prompt", help=f"text to continue (default: {DEFAULT_PROMPT!r} for a checkpoint trained on "
                                    f"the default corpus, else {GENERIC_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=_positive_int, default=50, help="(default %(default)s)")
    _add_sampling_args(p)
    p.add_argument("--top-p", type=_fraction_or_one, help="sample from the smallest set with this much probability")
    p.add_argument("--seed", type=int, help="seed for sampling (default 123)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype for --model weights (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")


def _fraction_or_one(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def run_generate_args(args: argparse.Namespace) -> str:
    return run_generate(args.prompt, checkpoint=args.checkpoint, model=args.model,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, greedy=args.greedy, device=args.device, dtype=args.dtype,
                        use_cache=not args.no_cache)


# -- gradcheck --------------------------------------------------------------------------------------

def _add_gradcheck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tol", type=_nonneg_float, default=1e-6, help="largest relative error allowed (default %(default)g)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="(default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="print every tensor's error, not only the worst")


def run_gradcheck_args(args: argparse.Namespace) -> int:
    return run_gradcheck(seed=args.seed, tol=args.tol, verbose=args.verbose, device=args.device)


# -- finetune classify, classify (the work is in numpygpt.finetune.classify) --------------------------

def _add_finetune_classify_args(p: argparse.ArgumentParser) -> None:
    """Every flag of ClassifyOptions (the book's recipe when none is given)."""
    from .finetune.classify import ClassifyOptions

    add_arguments(p, ClassifyOptions, suppress=True)


def _add_classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", required=True, help="a directory written by `numpygpt finetune classify`")
    p.add_argument("text", nargs="+", help="text(s) to label; one label a line")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default %(default)s)")


def _one_line_errors(fn):
    """Run ``fn()``; bad input (ValueError, a missing or unreadable file, no device) becomes one line, exit 2."""
    from .backend import DeviceError

    try:
        return fn()
    except (ValueError, OSError, DeviceError) as e:
        raise RunError(" ".join(str(e).split())) from e


def run_finetune_classify(given: dict):
    from .finetune.classify import finetune_classifier

    return _one_line_errors(lambda: finetune_classifier(**given))


def run_finetune_dpo(given: dict):
    from .finetune.dpo_recipe import finetune_dpo

    return _one_line_errors(lambda: finetune_dpo(log=lambda msg="": print(msg, flush=True), **given))


# -- instruction fine-tuning (numpygpt.finetune.instruct and .judge do the work) ----------------------

def _add_finetune_instruct_args(p: argparse.ArgumentParser) -> None:
    """Every flag of InstructOptions (the book's chapter 7 recipe by default)."""
    from .finetune.instruct import InstructOptions

    add_arguments(p, InstructOptions)


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("instruction", help="what the model should do")
    p.add_argument("--model", required=True, metavar="DIR", help="a fine-tuned model (finetune instruct's OUT/model), "
                   "or any model generate --model reads; it answers with its own tokenizer")
    p.add_argument("--input", default="", help="the instruction's input, if it has one")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="(default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default %(default)s)")
    from .finetune.instruct import ChatOptions

    add_arguments(p, ChatOptions)  # --prompt-style, as finetune instruct's


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge-model", default="llama3", help="(default %(default)s)")
    p.add_argument("--judge-url", default="http://localhost:11434", help="Ollama-compatible server (default %(default)s)")
    p.add_argument("--timeout", type=_nonneg_float, default=120.0, help="seconds per answer (default %(default)g)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="responses JSON (finetune instruct's OUT/test-responses.json)")
    p.add_argument("--out", metavar="JSON", help="where the scores go (default: FILE with -scores before .json)")
    p.add_argument("--key", default="model_response", help="the entry field to score (default %(default)s)")
    _add_judge_args(p)


def _add_make_preferences_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="instruction data, a JSON list of {instruction, input, output}")
    p.add_argument("--out", metavar="JSON", help="where the pairs go (default: FILE with -preferences before .json)")
    p.add_argument("--seed", type=int, default=123, help="seeds which entries get a politer answer (default %(default)s)")
    _add_judge_args(p)


def run_finetune_task(args: argparse.Namespace):
    """Run ``finetune instruct``, ``chat``, ``score-responses`` or ``make-preferences``: bad input
    is one line and exit code 2, a judge that cannot be asked one line and exit code 1."""
    from .finetune import instruct, judge, preferences

    def say(msg: str = "") -> None:
        print(msg, flush=True)

    def run() -> int:
        if args.command == "chat":
            model, tokenizer, _ = load_model(args.model, device=args.device)
            print(instruct.chat(model, args.instruction, args.input, args.max_new_tokens, tokenizer,
                                prompt_style=args.prompt_style), flush=True)
        elif args.command == "make-preferences":
            preferences.make_preferences_file(args.file, args.judge_model, args.judge_url, args.out, args.seed,
                                              args.timeout, progress=not args.no_progress, log=say)
        elif args.command == "score-responses":
            judge.score_file(args.file, args.judge_model, args.judge_url, args.out, args.key, args.timeout,
                             progress=not args.no_progress, log=say)
        else:
            opts = {k: v for k, v in vars(args).items() if k not in ("command", "task")}
            instruct.finetune_instruct(log=say, **opts)
        return 0

    try:
        return _one_line_errors(run)
    except judge.JudgeError as e:
        raise RunError(str(e), code=1) from e


# -- entry points -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="numpygpt", description="GPT-2 in NumPy/CuPy with hand-written backward passes.")
    from . import walkthrough
    from .translation import add_translation_args

    sub = parser.add_subparsers(dest="command",
                                metavar="{train,generate,tokenizer,finetune,classify,chat,score-responses,"
                                        "make-preferences,gradcheck,walkthrough,"
                                        "train-translation}",
                                required=True)
    _add_train_args(sub.add_parser("train", help="train a model (a small one on Python's manual by default)",
                                   description="Train a GPT model.", argument_default=argparse.SUPPRESS))
    _add_generate_args(sub.add_parser("generate", help="continue a prompt with a trained or pretrained model",
                                      description="Generate text from a checkpoint or GPT-2 weights."))
    add_tokenizer_args(sub.add_parser("tokenizer", help="train a tokenizer on your text",
                                      description="Train a byte-level BPE tokenizer on your text."))
    finetune = sub.add_parser("finetune", help="fine-tune pretrained GPT-2 for a task",
                              description="Fine-tune pretrained GPT-2 for a task.")
    tasks = finetune.add_subparsers(dest="task", metavar="{classify,instruct,dpo}", required=True)
    _add_finetune_classify_args(tasks.add_parser(
        "classify", help="train a text classifier (the book's chapter 6: spam or not)",
        description="Fine-tune GPT-2 as a text classifier (the book's chapter 6 recipe).",
        argument_default=argparse.SUPPRESS))
    _add_finetune_instruct_args(tasks.add_parser(
        "instruct", help="follow instructions (the book's chapter 7)",
        description="Instruction fine-tuning: the book's chapter-7 recipe by default."))
    from .finetune.dpo_recipe import add_dpo_args

    add_dpo_args(tasks.add_parser(
        "dpo", help="tune to preferences with DPO (the book's chapter 7 follow-up)",
        description="Preference tuning with Direct Preference Optimization: the book's recipe by default.",
        argument_default=argparse.SUPPRESS))
    _add_classify_args(sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                                      description="Label texts with a classifier written by `numpygpt finetune classify`."))
    _add_chat_args(sub.add_parser("chat", help="answer one instruction with an instruction-tuned model",
                                  description="Answer one instruction with an instruction-tuned model."))
    _add_score_args(sub.add_parser("score-responses", help="score responses with a judge model (Ollama API)",
                                   description="Score a responses file with a judge model (Ollama's /api/chat)."))
    _add_make_preferences_args(sub.add_parser(
        "make-preferences", help="make DPO preference pairs with a local model (Ollama API)",
        description="Make preference pairs: a local model rewrites each output to be more or less polite."))
    _add_gradcheck_args(sub.add_parser("gradcheck", help="check every backward pass against finite differences",
                                       description="Check every layer's backward pass against finite differences."))
    walkthrough.add_arguments(sub.add_parser("walkthrough", help="print one backward pass of a tiny GPT, op by op",
                                             description=walkthrough.DESCRIPTION))
    add_translation_args(sub.add_parser("train-translation", help="train an encoder-decoder to translate numbers "
                                        "between words and digits", description=TRANSLATION_DESCRIPTION))
    return parser


TRANSLATION_DESCRIPTION = ("Train the original Transformer (encoder, decoder, cross-attention) to translate "
                           "numbers between English words and digits, then print its held-out exact-match "
                           "accuracy and a few translations.")


def _ignore_late_signals() -> None:
    """The run is saved (or abandoned) and the process is leaving: a Ctrl-C now would only
    turn the exit into a traceback."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def run_cli(fn) -> int:
    """Run ``fn()`` turning user-facing failures into a message and an exit code.

    Under mpiexec every rank prints its own line, naming itself. A DistributedError or a
    stop request reaches every rank at the same point, so each simply exits; any other
    error may be one rank's alone (a file missing on one machine, a check only rank 0
    makes), so it aborts all the ranks rather than leave the others waiting in the next
    all-reduce.
    """
    from .distributed import DistributedError, current
    from .train import TrainingDivergedError, TrainingInterrupted

    try:
        result = fn()
    except (RunError, DistributedError, TrainingDivergedError, OSError) as e:
        # OSError: a full disk, a file that cannot be written: one line, not a traceback
        code = 1 if isinstance(e, TrainingDivergedError) else getattr(e, "code", 2)
        comm = current()
        many = comm is not None and comm.world_size > 1
        where = f" (rank {comm.rank} of {comm.world_size})" if many else ""
        sys.stderr.write(f"numpygpt: error{where}: {e}\n")  # one write: ranks' lines do not interleave
        sys.stderr.flush()
        if many and not isinstance(e, DistributedError):
            comm.abort(code)
        return code
    except TrainingInterrupted as e:
        comm = current()
        if comm is None or comm.is_main:  # the others stopped after the same step and saved nothing
            print(f"numpygpt: {e}", file=sys.stderr)
        return 128 + (e.signum or 2)
    except KeyboardInterrupt:
        print("numpygpt: interrupted (a checkpoint already on disk is intact)", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        given = {k: v for k, v in vars(args).items() if k != "command"}
        return run_cli(lambda: run_training(given))
    if args.command == "generate":
        return run_cli(lambda: run_generate_args(args))
    if args.command == "tokenizer":
        return run_cli(lambda: _one_line_errors(lambda: run_tokenizer_train(args)))
    if (args.command, getattr(args, "task", None)) == ("finetune", "instruct") or args.command in (
            "chat", "score-responses", "make-preferences"):
        return run_cli(lambda: run_finetune_task(args))
    if args.command == "finetune" and args.task == "dpo":
        given = {k: v for k, v in vars(args).items() if k not in ("command", "task")}
        return run_cli(lambda: run_finetune_dpo(given))
    if args.command == "finetune" and args.task == "classify":
        given = {k: v for k, v in vars(args).items() if k not in ("command", "task")}
        return run_cli(lambda: run_finetune_classify(given))
    if args.command == "classify":
        from .finetune.classify import classify_texts

        return run_cli(lambda: _one_line_errors(lambda: classify_texts(args.model, args.text, device=args.device)))
    if args.command == "walkthrough":
        from .walkthrough import run

        return run(args)
    if args.command == "train-translation":
        from .translation import run_translation

        return run_cli(lambda: _one_line_errors(lambda: run_translation(args)))
    return run_cli(lambda: run_gradcheck_args(args))


def train_main(argv=None, description: str | None = None) -> None:
    """``numpygpt train`` as a script (examples/train_gpt.py); exits with its code."""
    given = vars(build_train_parser(description=description).parse_args(argv))
    sys.exit(run_cli(lambda: run_training(given)))


def generate_main(argv=None, description: str | None = None) -> None:
    """``numpygpt generate`` as a script (examples/generate.py); exits with its code."""
    p = argparse.ArgumentParser(description=description or "Generate text from a checkpoint or GPT-2 weights.")
    _add_generate_args(p)
    args = p.parse_args(argv)
    sys.exit(run_cli(lambda: run_generate_args(args)))


def finetune_classify_main(argv=None, description: str | None = None) -> None:
    """``numpygpt finetune classify`` as a script (examples/finetune_classifier.py); exits with its code."""
    p = argparse.ArgumentParser(description=description or "Fine-tune GPT-2 as a text classifier.",
                                argument_default=argparse.SUPPRESS)
    _add_finetune_classify_args(p)
    given = vars(p.parse_args(argv))
    sys.exit(run_cli(lambda: run_finetune_classify(given)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
