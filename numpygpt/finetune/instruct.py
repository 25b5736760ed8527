"""Instruction fine-tuning, the book's chapter 7: training on Alpaca-style data
(``instruct_data``), and greedy responses for the test split.

    result = finetune_instruct(pretrained="gpt2-medium", data="instruction-data.json")
    result = finetune_instruct(InstructOptions(pretrained="gpt2", lora_rank=8, epochs=1))
    chat("runs/instruct/model", "Rewrite the sentence using a simile.", "The car is very fast.")

``finetune_instruct`` is ``numpygpt finetune instruct``: load GPT-2 with an untied head, split
the data 85/10/5, train with ``train_model`` (checkpoints, Ctrl-C, ``--resume``, accumulation,
MPI), then write the model and the test split's responses, which ``numpygpt score-responses``
scores with a judge model (``judge``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import numpy as np

from .. import backend
from ..fileio import write_json
from ..lora import ADAPTERS_FILE
from ..options import POSITIVE_INT, Options, option
from ..progress import progress_bar
from ..progress import say as _say
from .common import (MODEL_SOURCES, TextOptions, check_split, describe_model, directory_tokenizer, load_model,
                     planned_steps, recipe_field, start_run, trainable_adamw)
from .prompts import prompt_format
from .instruct_data import (BOOK_DATA_URL, PREAMBLE, RESPONSE_HEADER, Example, InstructionDataset,  # noqa: F401
                            collate_instructions, download_book_data, extract_response, format_example,
                            format_input, load_instruction_data, split_data, validate_entries)

__all__ = [
    "extract_response", "generate_response", "generate_responses", "finetune_instruct", "InstructOptions",
    "load_for_chat", "chat", "ChatOptions", "save_finetuned", "ADAPTERS_FILE", "RESPONSE_HEADER",
    # the data, from instruct_data (importable from here as before)
    "PREAMBLE", "BOOK_DATA_URL", "format_input", "format_example", "validate_entries", "load_instruction_data",
    "split_data", "Example", "InstructionDataset", "collate_instructions", "download_book_data",
]


def generate_response(model, entry: dict, tokenizer=None, max_new_tokens: int = 256,
                      eos_id: int | None = None, context_size: int | None = 1024, prompts=None) -> str:
    """The model's greedy answer to one entry: the prompt (``format_input``, or ``prompts``'s:
    ``finetune.prompts``) continued for at most ``max_new_tokens`` tokens, stopping at
    ``eos_id`` (None: the format's end, ``<|endoftext|>`` for the book's), with the response
    cut out (``extract_response``). The model sees the last ``context_size`` tokens (at most
    its own context)."""
    from ..generate import generate
    from ..tokenizer import get_tokenizer
    from .prompts import AlpacaPrompts

    prompts = prompts or AlpacaPrompts(tokenizer or get_tokenizer())
    prompt_ids = prompts.encode(prompts.prompt(entry))
    T_max = model.cfg.context_length
    context_size = T_max if context_size is None else min(context_size, T_max)
    out = generate(model, np.asarray(prompt_ids, dtype=np.int64), max_new_tokens, context_size=context_size,
                   temperature=0.0, eos_id=prompts.stop_id if eos_id is None else eos_id)  # (1, n + new)
    new_ids = backend.to_host(out)[0, len(prompt_ids):]
    return prompts.extract(prompts.tokenizer.decode(new_ids.tolist()))


def generate_responses(model, entries: list, path=None, tokenizer=None, max_new_tokens: int = 256,
                       progress: bool = True, key: str = "model_response", prompts=None) -> list[dict]:
    """Each entry with the model's greedy response added under ``key``. With ``path``, the
    list so far is rewritten there (atomically) after every entry, so an interrupted run
    keeps what it had."""
    done = []
    for entry in progress_bar(entries, "responses", progress):
        done.append({**entry, key: generate_response(model, entry, tokenizer, max_new_tokens, prompts=prompts)})
        if path is not None:
            write_json(path, done)
    if path is not None and not done:
        write_json(path, done)
    return done


# -- the chapter's recipe ------------------------------------------------------------------------

@dataclass
class InstructOptions(TextOptions):
    """``numpygpt finetune instruct``'s options; with none given, the book's chapter 7 recipe
    (GPT-2 medium, 2 epochs of batch 8, AdamW 5e-5 with weight decay 0.1 on every weight)."""

    pretrained: str = option("gpt2-medium", "the model to start from: " + MODEL_SOURCES, metavar="DIR_OR_NAME")
    data: str | None = option(None, "instruction data, a JSON list of {instruction, input, output} (default: the "
                              "book's instruction-data.json, downloaded once)", metavar="JSON")
    out: str = recipe_field("out", "runs/instruct")
    epochs: int = recipe_field("epochs", 2)
    lr: float = recipe_field("lr", 5e-5)
    mask_instruction: bool = option(False, "train on the response only (the prompt's targets are ignored)")
    max_new_tokens: int = option(256, "response length limit", check=POSITIVE_INT)

    def run_options(self, data_path: str) -> dict:
        """What a resumed run must share with the saved one (paths made absolute)."""
        keep = ("batch_size", "epochs", "lr", "weight_decay", "seed", "drop_rate", "mask_instruction", "lora_rank",
                "allowed_max_length", "dtype")
        options = {k: getattr(self, k) for k in keep + (("prompt_style",) if self.prompt_style else ())}
        options.update(pretrained=os.path.abspath(self.pretrained) if os.path.isdir(self.pretrained) else self.pretrained,
                       data=os.path.abspath(data_path), lora_alpha=self.alpha)
        if self.grad_accum != 1:
            options["grad_accum"] = self.grad_accum
        return options


@dataclass
class ChatOptions(Options):
    """``numpygpt chat``'s options that ``finetune instruct`` has too: the prompt format."""

    prompt_style: str | None = recipe_field("prompt_style", help="the prompt format the model was fine-tuned with: "
                                            "alpaca (the book's) or chat (its chat template); default: chat for "
                                            "Llama 3 and Qwen3, alpaca for GPT-2")


def finetune_instruct(options: InstructOptions | None = None, log=print, progress: bool | None = None,
                      **given) -> dict:
    """Fine-tune a pretrained GPT-2 to follow instructions, the book's chapter 7 by default.
    ``options``: an InstructOptions, or its fields as keywords.

    Loads ``pretrained`` with its own ``qkv_bias``, dropout ``drop_rate`` and an untied output
    head copied from the token embedding; splits ``data`` (None: the book's file, downloaded
    once) 85/10/5; trains with AdamW (``lr``, ``weight_decay`` on every parameter, as the book's
    ``torch.optim.AdamW(model.parameters())``) for ``epochs`` over batches of ``batch_size``
    shuffled with ``seed``, evaluating every ``eval_freq`` steps over ``eval_iter`` batches.
    ``lora_rank`` trains LoRA adapters (scale ``lora_alpha``) instead of every weight.

    Writes into ``out``: ``loss.png``, ``history.json``, ``model/`` (the fine-tuned model,
    ``save_pretrained``; LoRA adapters merged, and alone in ``lora-adapters.safetensors``) and
    ``test-responses.json`` (the test entries with their greedy ``model_response``).
    ``checkpoint.safetensors`` is written every ``checkpoint_every`` steps, at the end of
    training and when Ctrl-C or SIGTERM stops the run after its current step;
    ``resume=True`` continues from it with the same options (checked).
    Returns {"model", "history", "train", "test", "val", "responses", "paths"}.
    """
    from ..scaffold import RunFolder
    from ..train import TrainOptions

    o, comm, device = start_run(InstructOptions, options, given, progress)
    data_path = os.fspath(o.data) if o.data is not None else download_book_data()
    splits = check_split(data_path, split_data(load_instruction_data(data_path)), o.batch_size)
    backend.manual_seed(o.seed)  # dropout's generator: the same seed gives the same run
    model, tokenizer = _load_model(o, device)
    prompts = prompt_format(model, tokenizer, o.prompt_style)
    train_loader, val_loader = _loaders(o, model, prompts, splits, data_path)
    optimizer = trainable_adamw(model, o.lr, o.weight_decay)
    run = RunFolder(o.out, is_main=comm.is_main)
    run_options = o.run_options(data_path)
    state = run.resume(model, optimizer, run_options) if o.resume else None
    _print_plan(o, model, data_path, splits, len(train_loader), device, prompts, log)
    options = TrainOptions(grad_accum_steps=o.grad_accum, max_steps=o.max_steps, checkpoint_path=run.checkpoint,
                           checkpoint_every=o.checkpoint_every, resume_state=state, run_options=run_options,
                           progress=not o.no_progress, log=log)
    # each epoch's sample continues the first validation prompt (the book's); a chat prompt's
    # special tokens are not plain text to the sampler, so chat-style runs print none
    start_context = format_input(splits[2][0]) if prompts.name == "alpaca" else None
    history = _train(o, run, model, train_loader, val_loader, optimizer, options, start_context, tokenizer, log)
    paths = _write_outputs(o, run, model, history, comm, tokenizer, log)
    responses = []
    if comm.is_main:  # one rank generates and writes; the others are done
        responses = generate_responses(model, splits[1], paths["responses"], tokenizer, o.max_new_tokens,
                                       not o.no_progress, prompts=prompts)
    _say(f"responses   {paths['responses']} ({len(responses)} test entries)", log)
    return {"model": model, "history": history, "train": splits[0], "test": splits[1], "val": splits[2],
            "responses": responses, "paths": paths}


def _load_model(o: InstructOptions, device: str):
    """(model, tokenizer) of --pretrained, any family (a GPT-2 with an untied head, as the
    book's chapter 7 has it), LoRA adapters applied."""
    model, tokenizer = load_model(o.pretrained, device, dtype=o.dtype, drop_rate=o.drop_rate, untie_gpt2=True)
    if o.lora_rank is not None:
        from ..lora import apply_lora

        apply_lora(model, o.lora_rank, o.alpha, seed=o.seed)
    return model, tokenizer


def _loaders(o: InstructOptions, model, prompts, splits, data_path: str):
    """Training (shuffled with the seed) and validation loaders of padded, masked batches;
    a warning for entries longer than the allowed length (they are cut)."""
    import sys

    from ..data import DataLoader

    train_data, test_data, val_data = splits
    max_length = min(o.allowed_max_length, model.cfg.context_length)
    train_set = InstructionDataset(train_data, max_length=max_length, prompts=prompts)
    val_set = InstructionDataset(val_data, max_length=max_length, prompts=prompts)
    for name, dataset, offset in (("training", train_set, 0), ("validation", val_set, len(train_data) + len(test_data))):
        if dataset.too_long:
            first = [str(offset + i) for i in dataset.too_long[:5]]
            print(f"warning: {len(dataset.too_long)} {name} entries are longer than {max_length} tokens "
                  f"(entries {', '.join(first)}{', ...' if len(dataset.too_long) > 5 else ''} of {data_path}); "
                  "they are cut to that length", file=sys.stderr, flush=True)
    collate = partial(collate_instructions, pad_id=prompts.pad_id, allowed_max_length=max_length,
                      mask_instruction=o.mask_instruction)
    train_loader = DataLoader(train_set, o.batch_size, shuffle=True, drop_last=True, seed=o.seed, collate_fn=collate)
    val_loader = DataLoader(val_set, o.batch_size, shuffle=False, drop_last=False, collate_fn=collate)
    return train_loader, val_loader


def _print_plan(o: InstructOptions, model, data_path: str, splits, n_batches: int, device: str, prompts,
                log) -> None:
    cfg = model.cfg
    n_total, n_trainable = model.num_parameters(), model.num_parameters(trainable_only=True)
    total, steps_per_epoch = planned_steps(n_batches, o.grad_accum, o.epochs, o.max_steps)
    n_entries = sum(len(part) for part in splits)
    for line in (
        f"device      {device}",
        f"model       {describe_model(o.pretrained, cfg)}, {'tied' if cfg.tie_weights else 'untied'} head; "
        f"prompts {prompts.name}",
        f"parameters  {n_total:,}" + (f"; trainable {n_trainable:,} (LoRA rank {o.lora_rank})" if o.lora_rank else ""),
        f"data        {data_path}: {n_entries:,} entries: train {len(splits[0]):,}, test {len(splits[1]):,}, "
        f"val {len(splits[2]):,}",
        f"plan        {total:,} steps ({o.epochs} epochs of {steps_per_epoch:,}), batch {o.batch_size}"
        + (f" x {o.grad_accum}" if o.grad_accum > 1 else "") + f", AdamW lr {o.lr:g}, weight decay "
        f"{o.weight_decay:g}" + (", instruction masked" if o.mask_instruction else ""),
    ):
        _say(line, log)


def _train(o: InstructOptions, run, model, train_loader, val_loader, optimizer, options, start_context, tokenizer,
           log):
    """The losses before, ``train_model`` (resumable), the losses after."""
    from ..train import evaluate_model

    state = options.resume_state
    if state is None and run.is_main:
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, o.eval_iter)
        _say(f"before      train loss {train_loss:.3f}, val loss {val_loss:.3f}", log)
    elif state is not None:
        _say(f"resuming    at step {state.global_step:,} from {run.checkpoint}", log)
    history = run.train(model, train_loader, val_loader, optimizer, o.epochs, o.eval_freq, o.eval_iter,
                        resume_hint="the same command with --resume", options=options,
                        start_context=start_context, tokenizer=tokenizer)
    if run.is_main:  # under mpiexec one rank evaluates
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, o.eval_iter)
        _say(f"after       train loss {train_loss:.3f}, val loss {val_loss:.3f} (over {o.eval_iter} batches)", log)
        history["final_losses"] = [train_loss, val_loss]
    return history


def _write_outputs(o: InstructOptions, run, model, history, comm, tokenizer, log) -> dict:
    """The loss plot, the history and the model (the main process only), saved before the
    (long) generation so an interrupted generation loses no training."""
    from ..plots import plot_losses

    paths = {name: run.path(file) for name, file in (
        ("plot", "loss.png"), ("history", "history.json"), ("model", "model"), ("responses", "test-responses.json"),
        ("checkpoint", "checkpoint.safetensors"))}
    if o.lora_rank is not None:
        paths["adapters"] = os.path.join(paths["model"], ADAPTERS_FILE)
    if comm.is_main:
        plot_losses(history, paths["plot"])
        write_json(paths["history"], history)
        save_finetuned(model, paths["model"], tokenizer)
    _say(f"model       {paths['model']}" + (f" (LoRA merged; adapters alone in {paths['adapters']})"
                                            if o.lora_rank is not None else ""), log)
    return paths


def save_finetuned(model, directory, tokenizer=None) -> str | None:
    """The fine-tuned model as its family's Hugging Face directory, which ``from_pretrained``
    and ``chat`` read: ``lora.save_merged``, so a LoRA model is written with its adapters
    folded in (the model itself unchanged) and its adapters alone in
    ``directory/lora-adapters.safetensors`` (returned; None without LoRA). A tokenizer other
    than GPT-2's is saved beside the weights."""
    from ..lora import save_merged
    from ..tokenizer import save_tokenizer

    path = save_merged(model, directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    return path


# -- chat ----------------------------------------------------------------------------------------

def load_for_chat(model_dir, device: str = "auto", dtype: str = "float32"):
    """A fine-tuned model directory (``finetune_instruct``'s ``model/``, any family), in eval mode."""
    from ..hf import from_pretrained

    return from_pretrained(model_dir, dtype=dtype, device=backend.set_device(device))


def chat(model, instruction: str, input: str = "", max_new_tokens: int = 256, tokenizer=None,
         prompt_style: str | None = None, device: str = "auto") -> str:
    """The model's greedy response to one instruction (with an optional input), in the
    prompt format it was trained with (``prompt_style``: None is the family's default, the
    chat template for Llama 3 / Qwen3, the book's Alpaca format for GPT-2). ``model``: a
    model, or a model directory (read with its tokenizer, on ``device``)."""
    from ..tokenizer import get_tokenizer
    from .prompts import prompt_format

    if isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer or directory_tokenizer(model)
        model = load_for_chat(model, device)
    entry = validate_entries([{"instruction": instruction, "input": input, "output": ""}], "chat")[0]
    prompts = prompt_format(model, tokenizer or get_tokenizer(), prompt_style)
    return generate_response(model, entry, max_new_tokens=max_new_tokens, prompts=prompts)
