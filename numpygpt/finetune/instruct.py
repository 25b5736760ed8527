"""Instruction fine-tuning, the book's chapter 7: Alpaca-style data, padded batches with
masked targets, training, and greedy responses for the test split.

    entries = load_instruction_data("instruction-data.json")
    train, test, val = split_data(entries)                    # 85% / 10% / the rest, in file order
    loader = DataLoader(InstructionDataset(train), 8, collate_fn=collate_instructions)
    result = finetune_instruct(pretrained="gpt2-medium", data="instruction-data.json")

A training text is the Alpaca prompt (``format_input``) followed by
``"\\n\\n### Response:\\n" + output``, tokenised with GPT-2's BPE.

Batches of different lengths are padded on the right with ``<|endoftext|>`` (50256); see
``collate_instructions``. Right padding needs no attention mask: under the causal mask a
position attends only to itself and the positions before it, and the padding comes after
every real token, so the real tokens' logits are exactly those of the unpadded sequence,
and the padding's own targets are ``ignore_index`` (all but the first, which teaches the
model to stop), so they add nothing to the loss.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from typing import NamedTuple

import numpy as np

from .. import backend
from ..tokenizer import EOT_ID

__all__ = [
    "PREAMBLE", "BOOK_DATA_URL", "format_input", "format_example", "validate_entries",
    "load_instruction_data", "split_data", "Example", "InstructionDataset", "collate_instructions",
    "extract_response", "generate_response", "generate_responses", "write_json", "finetune_instruct",
    "load_for_chat", "chat", "download_book_data", "save_finetuned",
]

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
BOOK_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                 "ch07/01_main-chapter-code/instruction-data.json")


# -- the prompt ------------------------------------------------------------------------------

def format_input(entry: dict) -> str:
    """The book's Alpaca prompt: preamble, instruction, and the input when it is not empty."""
    text = PREAMBLE + "\n\n### Instruction:\n" + entry["instruction"]
    if entry.get("input"):
        text += "\n\n### Input:\n" + entry["input"]
    return text


def format_example(entry: dict) -> str:
    """The full training text: the prompt, then the response header and the output."""
    return format_input(entry) + RESPONSE_HEADER + entry["output"]


# -- the data ----------------------------------------------------------------------------------

def validate_entries(data, source: str = "data") -> list[dict]:
    """Check the book's format, a JSON list of {"instruction", "input", "output"} objects, and
    return the entries with ``input`` filled in ("" when missing or null). Other keys are kept
    but not used. Raises ValueError naming the first problem (and the entry's index)."""
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of {{instruction, input, output}} entries, "
                         f"got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{source}: the list of entries is empty")
    entries = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is a {type(entry).__name__}, not an object")
        for key in ("instruction", "output"):
            if key not in entry:
                raise ValueError(f"{source}: entry {i} has no {key!r}")
            if not isinstance(entry[key], str):
                raise ValueError(f"{source}: entry {i}'s {key!r} is a {type(entry[key]).__name__}, not a string")
        if not entry["instruction"].strip():
            raise ValueError(f"{source}: entry {i}'s 'instruction' is empty")
        value = entry.get("input")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{source}: entry {i}'s 'input' is a {type(value).__name__}, not a string")
        entries.append({**entry, "input": value or ""})
    return entries


def load_instruction_data(path) -> list[dict]:
    """Read and check an instruction file (see ``validate_entries``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instruction data {path!r} does not exist (or is not a file)")
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    return validate_entries(data, source=path)


def download_book_data(cache_dir=None) -> str:
    """The book's instruction-data.json (1,100 entries), downloaded once into the cache.

    Offline, the error says how to pass a local copy instead."""
    from ..download import default_cache_dir, download_file

    directory = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    path = os.path.join(directory, "instruction-data.json")
    if not os.path.isfile(path):
        os.makedirs(directory, exist_ok=True)
        try:
            download_file(BOOK_DATA_URL, path, verify=load_instruction_data)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"no --data given and the book's instruction data could not be downloaded from "
                f"{BOOK_DATA_URL} ({e}); download it where you are online and pass it with "
                "--data instruction-data.json") from e
    return path


def split_data(entries: list, train_frac: float = 0.85, test_frac: float = 0.10):
    """(train, test, val) in file order, no shuffle, as the book splits: the first
    ``int(0.85 n)`` entries train, the next ``int(0.1 n)`` test, the rest validate."""
    n = len(entries)
    n_train, n_test = int(n * train_frac), int(n * test_frac)
    return entries[:n_train], entries[n_train:n_train + n_test], entries[n_train + n_test:]


class Example(NamedTuple):
    """One tokenised training text and how many of its tokens are the prompt."""
    token_ids: np.ndarray  # (n,) int64
    prompt_length: int


class InstructionDataset:
    """Entries tokenised once: ``dataset[i]`` is an ``Example`` (ids of ``format_example``,
    and the length of ``format_input``'s ids, which ``mask_instruction`` needs).

    ``too_long`` lists the entries with more than ``max_length`` tokens: the collate cuts
    them to ``max_length`` (the book's ``allowed_max_length``), so their ends, and their
    end-of-text target, are not trained on.
    """

    def __init__(self, entries: list, tokenizer=None, max_length: int | None = None):
        from ..tokenizer import get_tokenizer

        tokenizer = tokenizer or get_tokenizer()
        self.examples = []
        for entry in entries:
            prompt_ids = tokenizer.encode(format_input(entry))
            ids = tokenizer.encode(format_example(entry))
            self.examples.append(Example(np.asarray(ids, dtype=np.int64), len(prompt_ids)))
        self.too_long = ([i for i, ex in enumerate(self.examples) if len(ex.token_ids) > max_length]
                         if max_length is not None else [])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> Example:
        return self.examples[i]


# -- the collate function ------------------------------------------------------------------------

def collate_instructions(batch, pad_id: int = EOT_ID, ignore_index: int = -100,
                         allowed_max_length: int | None = 1024, mask_instruction: bool = False):
    """Pad a list of token sequences into (inputs (B, T), targets (B, T)) int64 host arrays.

    The book's ``custom_collate_fn``: every sequence gets one ``pad_id`` (the end-of-text
    token) and is padded with ``pad_id`` to the batch's longest + 1, L = max(n) + 1; inputs
    are positions [0, L - 1), targets positions [1, L). In the targets every padding token
    but the first becomes ``ignore_index``, so the model learns to emit one end-of-text and
    the rest of the padding adds nothing to the loss. Then both are cut to
    ``allowed_max_length`` (None: no cut). Padding is on the right: see the module
    docstring for why no attention mask is needed.

    ``mask_instruction`` (the book's exercise 7.2) also sets the targets that predict a
    prompt token to ``ignore_index``, so only the response (from the "### Response:" header
    on) and the end-of-text are trained. It needs ``Example`` items (with the prompt
    length); plain sequences of ids are accepted otherwise.

    Targets are masked by position, not by value: an end-of-text token inside a text
    stays a target (the book's version masks every 50256 after the first by value).
    """
    seqs = [np.asarray(item.token_ids if isinstance(item, Example) else item, dtype=np.int64)
            for item in batch]
    if not seqs:
        raise ValueError("collate_instructions got an empty batch")
    if any(s.ndim != 1 or s.size == 0 for s in seqs):
        raise ValueError("every item must be a non-empty 1-D sequence of token ids")
    if allowed_max_length is not None and allowed_max_length < 1:
        raise ValueError(f"allowed_max_length must be >= 1 or None, got {allowed_max_length}")
    lengths = np.array([s.size for s in seqs])  # (B,) n
    B, L = len(seqs), int(lengths.max()) + 1
    positions = np.arange(L)  # (L,)
    padded = np.full((B, L), pad_id, dtype=np.int64)  # (B, L)
    padded[positions[None, :] < lengths[:, None]] = np.concatenate(seqs)  # row-major fill
    inputs = padded[:, :-1].copy()  # (B, L-1)
    targets = padded[:, 1:].copy()  # (B, L-1); target j is token j + 1
    # target j is padding when j + 1 > n; the first padding token (j = n - 1) stays
    targets[positions[None, :-1] >= lengths[:, None]] = ignore_index
    if mask_instruction:
        if not all(isinstance(item, Example) for item in batch):
            raise ValueError("mask_instruction needs Example items (InstructionDataset's), "
                             "which carry the prompt length")
        prompt_lengths = np.array([item.prompt_length for item in batch])  # (B,) P
        # target j predicts token j + 1, a prompt token while j + 1 < P
        targets[positions[None, :-1] < prompt_lengths[:, None] - 1] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


# -- responses -------------------------------------------------------------------------------------

def extract_response(continuation: str) -> str:
    """The response in a generated continuation of a prompt: the text after the first
    "### Response:" (all of it when the header is missing), stripped."""
    header = RESPONSE_HEADER.strip()
    _, found, after = continuation.partition(header)
    return (after if found else continuation).strip()


def generate_response(model, entry: dict, tokenizer=None, max_new_tokens: int = 256,
                      eos_id: int = EOT_ID, context_size: int | None = 1024) -> str:
    """The model's greedy answer to one entry: the prompt (``format_input``) continued for at
    most ``max_new_tokens`` tokens, stopping at ``eos_id``, with the response cut out
    (``extract_response``). The model sees the last ``context_size`` tokens (at most its
    own context)."""
    from ..generate import generate
    from ..tokenizer import get_tokenizer

    tokenizer = tokenizer or get_tokenizer()
    prompt_ids = tokenizer.encode(format_input(entry))
    T_max = model.cfg.context_length
    context_size = T_max if context_size is None else min(context_size, T_max)
    out = generate(model, np.asarray(prompt_ids, dtype=np.int64), max_new_tokens, context_size=context_size,
                   temperature=0.0, eos_id=eos_id)  # (1, n + new)
    new_ids = backend.to_host(out)[0, len(prompt_ids):]
    return extract_response(tokenizer.decode(new_ids.tolist()))


def progress_bar(items, desc: str, enabled: bool = True, **kw):
    """A tqdm bar over ``items`` on stderr, redrawn seldom when stderr is a log file."""
    from tqdm.auto import tqdm

    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(items, desc=desc, unit="entry", disable=not enabled, file=sys.stderr,
                mininterval=0.5 if interactive else 30.0, **kw)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file, then rename)."""
    from ..fileio import atomic_write

    with atomic_write(path) as fh:
        fh.write((json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode("utf-8"))


def generate_responses(model, entries: list, path=None, tokenizer=None, max_new_tokens: int = 256,
                       progress: bool = True, key: str = "model_response") -> list[dict]:
    """Each entry with the model's greedy response added under ``key``. With ``path``, the
    list so far is rewritten there (atomically) after every entry, so an interrupted run
    keeps what it had."""
    done = []
    for entry in progress_bar(entries, "responses", progress):
        done.append({**entry, key: generate_response(model, entry, tokenizer, max_new_tokens)})
        if path is not None:
            write_json(path, done)
    if path is not None and not done:
        write_json(path, done)
    return done


# -- the chapter's recipe ------------------------------------------------------------------------

def finetune_instruct(pretrained: str = "gpt2-medium", data=None, out: str = "runs/instruct",
                      batch_size: int = 8, epochs: int = 2, lr: float = 5e-5, weight_decay: float = 0.1,
                      eval_freq: int = 5, eval_iter: int = 5, seed: int = 123, drop_rate: float = 0.0,
                      mask_instruction: bool = False, lora_rank: int | None = None,
                      lora_alpha: float | None = None, allowed_max_length: int = 1024,
                      max_new_tokens: int = 256, max_steps: int | None = None, device: str = "auto",
                      dtype: str = "float32", checkpoint_every: int | None = None, resume: bool = False,
                      progress: bool = True, log=print) -> dict:
    """Fine-tune a pretrained GPT-2 to follow instructions, the book's chapter 7 by default.

    Loads ``pretrained`` (a name such as 'gpt2-medium' or a Hugging Face directory) with its
    own ``qkv_bias``, dropout ``drop_rate`` and an untied output head copied from the token
    embedding; splits ``data`` (a path; None: the book's file, downloaded once) 85/10/5;
    trains with AdamW (``lr``, ``weight_decay`` on every parameter, as the book's
    ``torch.optim.AdamW(model.parameters())``) for ``epochs`` over batches of ``batch_size``
    shuffled with ``seed``, evaluating every ``eval_freq`` steps over ``eval_iter`` batches.
    ``lora_rank`` trains LoRA adapters (scale ``lora_alpha``) instead of every weight.

    Writes into ``out``: ``loss.png``, ``history.json``, ``model/`` (the fine-tuned model,
    ``save_pretrained``; LoRA adapters merged, and alone in ``lora-adapters.safetensors``) and
    ``test-responses.json`` (the test entries with their greedy ``model_response``).

    Runs that lose nothing: ``checkpoint.safetensors`` in ``out`` holds the weights (LoRA
    adapters included), the AdamW state, the RNG and the position in the data, written every
    ``checkpoint_every`` steps, at the end of training and when Ctrl-C or SIGTERM stops the
    run after its current step (``TrainingInterrupted``). ``resume=True`` continues from it
    with the same options (checked: a different learning rate, batch size, data file... is a
    ValueError); the continued run ends where the uninterrupted one would have.
    Returns {"model", "history", "train", "test", "val", "responses", "paths"}.
    """
    from ..data import DataLoader
    from ..model import GPTModel
    from ..optim import AdamW
    from ..tokenizer import get_tokenizer
    from ..train import TrainingInterrupted, evaluate_model, plot_losses, stop_on_signals, train_model

    def say(msg: str = "") -> None:
        if log is not None:
            log(msg)

    device = backend.set_device(device)
    data_path = os.fspath(data) if data is not None else download_book_data()
    entries = load_instruction_data(data_path)
    train_data, test_data, val_data = split_data(entries)
    if len(train_data) < batch_size:
        raise ValueError(f"{data_path}: the training split has {len(train_data)} entries, fewer than "
                         f"the batch size {batch_size}: use more entries or a smaller batch size")
    if not val_data:
        raise ValueError(f"{data_path}: {len(entries)} entries leave no validation entries "
                         "(the split is 85% train, 10% test, the rest validation)")

    backend.manual_seed(seed)  # dropout's generator: the same seed gives the same run
    model = GPTModel.from_pretrained(pretrained, dtype=dtype, device=device, drop_rate=drop_rate, tie_weights=False)
    n_total = model.num_parameters()
    if lora_rank is not None:
        from ..lora import apply_lora

        apply_lora(model, lora_rank, lora_alpha if lora_alpha is not None else lora_rank, seed=seed)
    n_trainable = model.num_parameters(trainable_only=True)
    cfg = model.cfg
    max_length = min(allowed_max_length, cfg.context_length)

    tokenizer = get_tokenizer()
    train_set = InstructionDataset(train_data, tokenizer, max_length)
    val_set = InstructionDataset(val_data, tokenizer, max_length)
    for name, dataset, offset in (("training", train_set, 0), ("validation", val_set, len(train_data) + len(test_data))):
        if dataset.too_long:
            first = [str(offset + i) for i in dataset.too_long[:5]]
            print(f"warning: {len(dataset.too_long)} {name} entries are longer than {max_length} tokens "
                  f"(entries {', '.join(first)}{', ...' if len(dataset.too_long) > 5 else ''} of {data_path}); "
                  "they are cut to that length", file=sys.stderr, flush=True)
    collate = partial(collate_instructions, allowed_max_length=max_length, mask_instruction=mask_instruction)
    train_loader = DataLoader(train_set, batch_size, shuffle=True, drop_last=True, seed=seed, collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size, shuffle=False, drop_last=False, collate_fn=collate)

    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=lr, weight_decay=weight_decay)

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, file) for name, file in (
        ("plot", "loss.png"), ("history", "history.json"), ("model", "model"),
        ("responses", "test-responses.json"))}

    say(f"device      {device}")
    say(f"model       {pretrained}: emb_dim {cfg.emb_dim}, {cfg.n_layers} layers, context {cfg.context_length}, "
        f"qkv_bias {cfg.qkv_bias}, untied head, drop_rate {cfg.drop_rate}")
    say(f"parameters  {n_total:,}" + (f"; trainable {n_trainable:,} (LoRA rank {lora_rank})" if lora_rank else ""))
    say(f"data        {data_path}: {len(entries):,} entries: train {len(train_data):,}, "
        f"test {len(test_data):,}, val {len(val_data):,}")
    total = epochs * len(train_loader) if max_steps is None else min(max_steps, epochs * len(train_loader))
    say(f"plan        {total:,} steps ({epochs} epochs of {len(train_loader):,}), batch {batch_size}, "
        f"AdamW lr {lr:g}, weight decay {weight_decay:g}" + (", instruction masked" if mask_instruction else ""))
    paths["checkpoint"] = os.path.join(out, "checkpoint.safetensors")
    run_options = {"pretrained": os.path.abspath(pretrained) if os.path.isdir(pretrained) else pretrained,
                   "data": os.path.abspath(data_path), "batch_size": batch_size, "epochs": epochs, "lr": lr,
                   "weight_decay": weight_decay, "seed": seed, "drop_rate": drop_rate,
                   "mask_instruction": mask_instruction, "lora_rank": lora_rank,
                   "lora_alpha": lora_alpha if lora_alpha is not None else lora_rank,
                   "allowed_max_length": allowed_max_length, "dtype": dtype}
    resume_state = _resume_state(paths["checkpoint"], model, optimizer, run_options) if resume else None
    if resume_state is None:
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter)
        say(f"before      train loss {train_loss:.3f}, val loss {val_loss:.3f}")
    else:
        say(f"resuming    at step {resume_state.global_step:,} from {paths['checkpoint']}")

    with stop_on_signals() as stop:  # Ctrl-C / SIGTERM: finish the step, save, say how to resume
        try:
            history = train_model(
                model, train_loader, val_loader, optimizer, num_epochs=epochs, eval_freq=eval_freq,
                eval_iter=eval_iter, start_context=format_input(val_data[0]), tokenizer=tokenizer,
                progress=progress, log=log, max_steps=max_steps, checkpoint_path=paths["checkpoint"],
                checkpoint_every=checkpoint_every, resume_state=resume_state, run_options=run_options,
                stop_requested=stop)
        except TrainingInterrupted as e:
            e.args = (f"{e}\nto continue this run: the same command with --resume",)
            raise
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter)
    say(f"after       train loss {train_loss:.3f}, val loss {val_loss:.3f} (over {eval_iter} batches)")
    history["final_losses"] = [train_loss, val_loss]
    plot_losses(history, paths["plot"])
    write_json(paths["history"], history)

    # saved before the (long) generation, so an interrupted generation loses no training
    if lora_rank is not None:
        paths["adapters"] = os.path.join(out, "lora-adapters.safetensors")
    save_finetuned(model, paths["model"], paths.get("adapters"))
    say(f"model       {paths['model']}" + (f" (LoRA merged; adapters alone in {paths['adapters']})"
                                           if lora_rank is not None else ""))
    responses = generate_responses(model, test_data, paths["responses"], tokenizer, max_new_tokens, progress)
    say(f"responses   {paths['responses']} ({len(responses)} test entries)")
    return {"model": model, "history": history, "train": train_data, "test": test_data, "val": val_data,
            "responses": responses, "paths": paths}


def _resume_state(path: str, model, optimizer, run_options: dict):
    """Load ``path`` into ``model`` and ``optimizer`` (weights, AdamW state, RNG) and return
    its TrainState, after checking it was written by a run with the same options."""
    from ..checkpoint import load_checkpoint
    from ..train import TrainState

    if not os.path.exists(path):
        raise ValueError(f"cannot resume: there is no {path} (runs write it every --checkpoint-every steps, "
                         "at the end of training and when interrupted)")
    state = TrainState.from_checkpoint(load_checkpoint(path, model, optimizer))
    stored = state.run_options or {}
    for key, value in run_options.items():
        if key in stored and stored[key] != value:
            raise ValueError(f"cannot resume: {path} was trained with {key} {stored[key]!r}, this run has "
                             f"{value!r}: resume with the same options")
    return state


def save_finetuned(model, directory, adapters_path=None) -> None:
    """``save_pretrained``. A model with LoRA adapters has them written alone to
    ``adapters_path`` (``save_lora``; skipped when None) and then folded into its weights
    (``merge_lora``; the model stays merged, which also makes generation cheaper), so the
    directory is a plain GPT-2 that ``from_pretrained`` and ``chat`` read."""
    from ..lora import is_merged, lora_layers, merge_lora, save_lora

    if lora_layers(model) and not is_merged(model):
        if adapters_path is not None:
            save_lora(model, adapters_path)
        merge_lora(model)
    model.save_pretrained(directory)


# -- chat ----------------------------------------------------------------------------------------

def load_for_chat(model_dir, device: str = "auto", dtype: str = "float32"):
    """A fine-tuned model directory (``finetune_instruct``'s ``model/``), in eval mode."""
    from ..model import GPTModel

    return GPTModel.from_pretrained(model_dir, dtype=dtype, device=backend.set_device(device))


def chat(model, instruction: str, input: str = "", max_new_tokens: int = 256, tokenizer=None) -> str:
    """The model's greedy response to one instruction (with an optional input), in the
    same prompt format as training. ``model``: a GPTModel or a model directory."""
    if isinstance(model, (str, os.PathLike)):
        model = load_for_chat(model)
    entry = validate_entries([{"instruction": instruction, "input": input, "output": ""}], "chat")[0]
    return generate_response(model, entry, tokenizer, max_new_tokens)
