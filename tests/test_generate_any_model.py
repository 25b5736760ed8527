"""``numpygpt generate --model`` and ``chat --model`` for every family: a Hugging Face directory
of GPT-2, Llama 3 or Qwen3, a numpygpt run folder or checkpoint, each decoded with the model's
own tokenizer (the directory's tokenizer.json or tokenizer.model, the one a run was trained
with, GPT-2's BPE only for GPT-2). Tiny models and tokenizers, all written here."""

import base64

import pytest

from numpygpt import GPTConfig, GPTModel, LlamaConfig, LlamaModel, save_pretrained
from numpygpt.cli import main
from numpygpt.data import default_corpus
from numpygpt.generate import generate_text
from numpygpt.run import load_model
from numpygpt.tokenizer import get_tokenizer, load_tokenizer, train_bpe

PROMPT = "The for statement"
TEXT = default_corpus()[:6000]


def write_tiktoken_model(path, n_merged=40):
    """A Llama 3 tokenizer.model: the 256 bytes, then the first ``n_merged`` two-byte pairs of
    TEXT's words (tiktoken's format: base64 token, rank)."""
    pairs = list(dict.fromkeys(w[i:i + 2].encode() for w in TEXT.split() if w.isascii() for i in range(len(w) - 1)))
    tokens = [bytes([b]) for b in range(256)] + [p for p in pairs if len(p) == 2][:n_merged]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def hf_dir(root, name, model, tokenizer=None):
    """A Hugging Face directory of ``model`` (config.json + model.safetensors), with the
    tokenizer's file when one is given."""
    directory = root / name
    save_pretrained(model, directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    bpe = train_bpe(TEXT, 300)
    tiktoken = load_tokenizer(write_tiktoken_model(root / "tiktoken" / "tokenizer.model"))
    qwen = LlamaModel(LlamaConfig.preset("qwen3-tiny", vocab_size=bpe.n_vocab), seed=1)
    # a padded vocabulary, as published models have it: rows past the tokenizer's last id
    llama = LlamaModel(LlamaConfig.preset("llama-tiny", vocab_size=tiktoken.n_vocab + 8), seed=2)
    gpt2 = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=8, n_heads=2, n_layers=1), seed=3)
    return {"qwen3": hf_dir(root, "qwen3", qwen, bpe), "llama": hf_dir(root, "llama", llama, tiktoken),
            "gpt2": hf_dir(root, "gpt2", gpt2), "bpe": bpe, "tiktoken": tiktoken, "root": root}


def greedy(directory, tokenizer, n=6):
    """What the model in ``directory`` says with ``tokenizer``, computed here."""
    model, _, _ = load_model(directory, device="cpu")
    return generate_text(model, PROMPT, n, tokenizer=tokenizer, temperature=0.0)


@pytest.mark.parametrize("family,tokenizer", [("qwen3", "bpe"), ("llama", "tiktoken"), ("gpt2", None)])
def test_generate_decodes_a_directory_with_its_own_tokenizer(dirs, capsys, family, tokenizer):
    """tokenizer.json (Qwen3 here), tokenizer.model (Llama 3), none (GPT-2: its BPE)."""
    tok = dirs[tokenizer] if tokenizer else get_tokenizer()
    model, loaded, saved = load_model(dirs[family], device="cpu")
    assert model.cfg.model_type == family and saved is None
    assert loaded.n_vocab == tok.n_vocab and loaded.encode(PROMPT) == tok.encode(PROMPT)
    assert main(["generate", "--model", str(dirs[family]), "--prompt", PROMPT, "--max-new-tokens", "6",
                 "--greedy", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out == greedy(dirs[family], tok) + "\n"
    assert out.startswith(PROMPT) and len(out.strip()) > len(PROMPT)


def test_a_run_folder_and_its_checkpoint_decode_with_the_runs_tokenizer(dirs, tmp_path, capsys):
    """train --arch qwen3 --tokenizer DIR, then generate/chat --model RUN_FOLDER (or the
    checkpoint file): the tokenizer saved with the run, not GPT-2's."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    dirs["bpe"].save(tok_dir)
    run = tmp_path / "run"
    assert main(["train", "--arch", "qwen3", "--emb-dim", "16", "--n-layers", "1", "--context-length", "16",
                 "--data", str(data), "--tokenizer", str(tok_dir), "--batch-size", "2", "--max-steps", "2",
                 "--prompt", "", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    expected = greedy(run, dirs["bpe"])
    for source in (run, run / "checkpoint.safetensors"):
        assert main(["generate", "--model", str(source), "--prompt", PROMPT, "--max-new-tokens", "6", "--greedy",
                     "--device", "cpu"]) == 0
        assert capsys.readouterr().out == expected + "\n"
    assert main(["chat", "Say hi.", "--model", str(run), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() != ""  # answered, with ids of its own 300-token vocabulary


def test_chat_answers_with_the_directorys_tokenizer(dirs, capsys):
    from numpygpt.finetune.instruct import generate_response
    from numpygpt.finetune.prompts import prompt_format

    assert main(["chat", "Name a loop.", "--model", str(dirs["llama"]), "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    model, tok, _ = load_model(dirs["llama"], device="cpu")
    entry = {"instruction": "Name a loop.", "input": "", "output": ""}
    prompts = prompt_format(model, tok)  # the family's default for this tokenizer, as finetune instruct uses
    want = generate_response(model, entry, max_new_tokens=5, prompts=prompts)
    assert capsys.readouterr().out == want + "\n"


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("numpygpt: error:"), err
    return err[0]


def test_a_tokenizer_that_does_not_fit_the_model_is_one_line(dirs, capsys):
    root = dirs["root"]
    small = LlamaModel(LlamaConfig.preset("llama-tiny", vocab_size=128), seed=0)  # fewer rows than tokens
    directory = hf_dir(root, "too_small", small, dirs["bpe"])
    line = one_line_error(capsys, main(["generate", "--model", str(directory), "--device", "cpu"]))
    assert f"has {dirs['bpe'].n_vocab} tokens but the model's vocab_size is 128" in line
    line = one_line_error(capsys, main(["chat", "Hi.", "--model", str(directory), "--device", "cpu"]))
    assert "vocab_size is 128" in line


def test_a_llama_directory_without_a_tokenizer_is_one_line(dirs, capsys):
    bare = hf_dir(dirs["root"], "bare", LlamaModel(LlamaConfig.preset("llama-tiny"), seed=0))
    line = one_line_error(capsys, main(["generate", "--model", str(bare), "--device", "cpu"]))
    assert "has no tokenizer (tokenizer.json, tokenizer.model" in line and "llama model" in line

