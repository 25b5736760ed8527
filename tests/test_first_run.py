"""The quick start's first run: the default corpus is tidied (indentation and hard wraps
would be a quarter of its tokens), and the default model, trained briefly, prints a sampled
continuation made of varied words from its corpus, with the settings that reproduce it."""

import contextlib
import io
import re
import shlex

import pytest

from numpygpt.cli import main
from numpygpt.run import DEFAULT_PROMPT, SMALL_MODEL, run_training, sampling_options
from numpygpt.data import default_corpus, tidy_text
from numpygpt.generate import SAMPLING_DEFAULTS, describe_sampling, generate_text
from numpygpt.nn import no_grad
from numpygpt.tokenizer import text_to_token_ids

MANUAL = """The "assert" statement
**********************

Assert statements are a convenient way to insert debugging
assertions into a program:

   assert_stmt ::= "assert" expression ["," expression]

The simple form is equivalent to

   if __debug__:
       if not expression: raise AssertionError

* A list item, a “starred”
  target, wraps onto a second line.
"""


def test_tidy_text_reflows_prose_and_keeps_code_lines():
    tidy = tidy_text(MANUAL)
    assert tidy == (
        'The "assert" statement\n\n'
        "Assert statements are a convenient way to insert debugging assertions into a program:\n\n"
        'assert_stmt ::= "assert" expression ["," expression]\n\n'
        "The simple form is equivalent to\n\n"
        "if __debug__:\nif not expression: raise AssertionError\n\n"
        '* A list item, a "starred" target, wraps onto a second line.\n'
    )


def test_the_tidy_default_corpus_spends_few_tokens_on_whitespace():
    raw, tidy = default_corpus(tidy=False), default_corpus()
    assert tidy == tidy_text(raw)
    assert "  " not in tidy and not re.search(r"^ ", tidy, re.M)
    assert set(_words(tidy)) == set(_words(raw))  # every word is kept
    n_raw, n_tidy = len(text_to_token_ids(raw)), len(text_to_token_ids(tidy))
    assert n_tidy < 0.85 * n_raw


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z_]+", text)


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory):
    """`numpygpt train` with its defaults (model shape, lr, schedule, sampling) on the start
    of the default corpus, for 40 steps of 2 windows instead of 400 of 8: only the data and
    the step count shrink. Returns (result, what it printed, the text it trained on)."""
    tmp = tmp_path_factory.mktemp("first_run")
    text = default_corpus()[:30_000]
    (tmp / "manual.txt").write_text(text, encoding="utf-8")
    given = dict(data=str(tmp / "manual.txt"), prompt=DEFAULT_PROMPT, max_steps=40, batch_size=2,
                 eval_freq=1000, eval_iter=1, device="cpu", out=str(tmp / "run"), no_progress=True,
                 checkpoint_every=10**6)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_training(given)
    return result, printed.getvalue(), text


def test_the_default_model_trained_briefly_samples_varied_words_of_its_corpus(briefly_trained):
    """Eight seeds, not one lucky one. After 40 steps the model knows which words the
    manual uses but little of their order; greedy decoding gives only line breaks (no
    words) and an untrained model's samples are ~80% fragments that are not the manual's
    words, so each bound below fails for one of them."""
    result, _, text = briefly_trained
    cfg = result["model"].cfg
    assert {k: getattr(cfg, k) for k in SMALL_MODEL} == SMALL_MODEL  # the default shape, not a smaller one
    vocabulary = set(_words(text))
    model = result["model"].eval()
    samples = []
    for seed in range(1, 9):
        with no_grad():
            samples.append(_words(generate_text(model, DEFAULT_PROMPT, 30, **sampling_options(seed=seed))
                                  [len(DEFAULT_PROMPT):]))
    for words in samples:
        assert len(words) >= 5, samples  # words, not only whitespace and punctuation
        assert len(set(words)) / len(words) >= 0.3, samples  # not one word over and over
    assert sum(len(w) for w in samples) / len(samples) >= 10, samples
    assert sum(len(set(w)) / len(w) for w in samples) / len(samples) >= 0.45, samples
    pooled = [w for words in samples for w in words]
    assert sum(w in vocabulary for w in pooled) / len(pooled) >= 0.85, samples  # the corpus's words


def test_the_run_prints_its_sample_with_the_settings_that_reproduce_it(briefly_trained, capsys):
    result, printed, _ = briefly_trained
    settings = describe_sampling(**SAMPLING_DEFAULTS)
    assert settings == "temperature 0.8, top-k 40, seed 123"
    last_sample = [line for line in printed.splitlines() if " sample " in line][-1]
    assert f"({settings}) {DEFAULT_PROMPT}" in last_sample
    command = [line for line in printed.splitlines() if line.startswith("sample more")][-1]
    argv = shlex.split(command[len("sample more"):])
    assert argv[:5] == ["python", "-m", "numpygpt", "generate", "--checkpoint"] and "--temperature" in argv

    # `numpygpt generate` with that command line prints that sample again
    assert main(["generate", *argv[4:], "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert last_sample.endswith(out.strip().replace("\n", " ")), (last_sample, out)
    assert f"sampling with {settings}" in err and "--greedy" in err

    # greedy is one flag away
    ckpt = result["checkpoint"]
    assert main(["generate", "--checkpoint", ckpt, "--prompt", DEFAULT_PROMPT, "--max-new-tokens", "30",
                 "--greedy", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    with no_grad():
        assert out.strip() == generate_text(result["model"].eval(), DEFAULT_PROMPT, 30).strip()
    assert "greedy decoding" in err


def test_generate_prompts_a_default_corpus_checkpoint_with_the_default_prompt(tmp_path, capsys):
    given = dict(preset="tiny", max_steps=1, batch_size=2, eval_iter=1, device="cpu", out=str(tmp_path),
                 no_progress=True, prompt="")
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_training(given)  # the default corpus
    assert main(["generate", "--checkpoint", result["checkpoint"], "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(DEFAULT_PROMPT)
