"""Every ```python snippet in README.md and docs/*.md runs, and checks something.

The conventions, for whoever writes a guide:

- A ```python block runs on its own (its own imports, nothing shared with the blocks before
  it), in a fresh empty working directory, offline and in a few seconds: tiny models, files it
  writes itself.
- It checks something: it has an ``assert``, or it is followed by ``Output:`` and a ```text
  block holding what it prints, compared numbers aside (they differ in the last digits from
  machine to machine).
- A block that cannot run here (it downloads weights, needs a GPU) starts with the line
  ``# not run by the tests: <why>``, which the reader sees too.
- ```bash, ```text and unlabelled blocks are never run.

docs/backward.md is held to more: every section has a snippet, every snippet asserts *and*
shows its output. After editing a page's snippets, regenerate its outputs with

    PYTHONPATH=. python tests/test_docs.py docs/backward.md      (or README.md, docs/lora.md, ...)
"""

import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from numpygpt import backend, parallel

ROOT = Path(__file__).resolve().parents[1]
BACKWARD = ROOT / "docs" / "backward.md"
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# a ```python block, optionally followed by "Output:" and a ```text block
BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```(?P<out>\n\nOutput:\n\n```text\n(?P<text>.*?)```)?", re.S | re.M)
NOT_RUN = re.compile(r"\A# not run by the tests: (?P<why>.*)")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def snippets(markdown: str):
    return list(BLOCK.finditer(markdown))


def run_snippet(code: str, name: str) -> str:
    """Run ``code`` in a fresh temporary directory; what it printed. The device and the thread
    count it may change are put back."""
    out = io.StringIO()
    device, threads, cwd = backend.get_device(), parallel.get_num_threads(), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, name, "exec"), {"__name__": name})
        finally:
            os.chdir(cwd)
            backend.set_device(device)
            parallel.set_num_threads(threads)
    return out.getvalue()


def skeleton(text: str) -> str:
    """The printed text with every number replaced by '#' and runs of spaces squeezed."""
    return re.sub(r"[ \t]+", " ", NUMBER.sub("#", text)).strip()


def _heading_before(markdown: str, pos: int) -> str:
    """The title of the last # or ## heading before ``pos``, outside code blocks."""
    heading, in_code = "top", False
    for line in markdown[:pos].splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"##? ", line):
            heading = line.split(" ", 1)[1]
    return heading


def _label(page: Path, markdown: str, m) -> str:
    return f"{page.relative_to(ROOT)}: {_heading_before(markdown, m.start())}"


SOURCES = {page: page.read_text(encoding="utf-8") for page in PAGES}
ALL = [(page, m) for page, text in SOURCES.items() for m in snippets(text)]
RUNNABLE = [(page, m) for page, m in ALL if not NOT_RUN.match(m["code"])]


def test_the_pages_have_snippets():
    assert BACKWARD in SOURCES and ROOT / "README.md" in SOURCES
    assert len(RUNNABLE) >= 20, len(RUNNABLE)


def test_every_backward_section_has_a_checked_snippet():
    source = SOURCES[BACKWARD]
    sections = re.findall(r"^## (.+)$", source, re.M)
    expected = ["Cross-entropy", "output head", "LayerNorm", "residual", "MLP and GELU", "Attention",
                "embeddings", "whole model"]
    for word in expected:
        assert any(word in s for s in sections), word
    found = snippets(source)
    covered = {_heading_before(source, m.start()) for m in found}
    for section in sections[1:]:  # the first section introduces the notation
        assert section in covered, f"section {section!r} has no runnable snippet"
    for m in found:
        assert not NOT_RUN.match(m["code"]), "every snippet of backward.md runs"
        assert "assert " in m["code"], f"a snippet in {_heading_before(source, m.start())!r} checks nothing"
        assert m["text"] is not None, f"a snippet in {_heading_before(source, m.start())!r} shows no output"


@pytest.mark.parametrize("page, m", RUNNABLE, ids=[_label(p, SOURCES[p], m) for p, m in RUNNABLE])
def test_snippet_runs_and_prints_what_the_page_shows(page, m):
    label = _label(page, SOURCES[page], m)
    assert "assert " in m["code"] or m["text"] is not None, f"{label}: the snippet checks nothing"
    printed = run_snippet(m["code"], label)
    if m["text"] is not None:
        assert skeleton(printed) == skeleton(m["text"]), label


def test_snippets_not_run_say_why():
    skipped = [(page, m) for page, m in ALL if NOT_RUN.match(m["code"])]
    assert skipped, "the convention is in use (docs/pretrained.md downloads GPT-2 by name)"
    for page, m in skipped:
        why = NOT_RUN.match(m["code"])["why"]
        assert len(why.split()) >= 2, f"{_label(page, SOURCES[page], m)}: say why it is not run"
        assert m["text"] is None, f"{_label(page, SOURCES[page], m)}: an output nobody checks"


def test_no_python_block_escapes_the_pattern():
    """A ```python block the pattern does not see (indented, say) would never run."""
    for page, text in SOURCES.items():
        opened = len(re.findall(r"```python", text))
        assert opened == len(snippets(text)), f"{page.relative_to(ROOT)}: a ```python block is not at a line start"


def test_every_guide_is_on_the_readme_map():
    readme = SOURCES[ROOT / "README.md"]
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md's map has no line for docs/{page.name}"


def test_skeleton_ignores_digits_but_not_words():
    assert skeleton("err 1.5e-10 True") == skeleton("err  2e-9 True")
    assert skeleton("err 1.5e-10 True") != skeleton("err 1.5e-10 False")


def test_run_snippet_puts_the_directory_and_threads_back():
    cwd, threads = os.getcwd(), parallel.get_num_threads()
    printed = run_snippet("import os\nfrom numpygpt import parallel\nparallel.set_num_threads(1)\n"
                          "print(os.listdir('.'))\nopen('x.txt', 'w').close()", "probe")
    assert printed.strip() == "[]"
    assert os.getcwd() == cwd and parallel.get_num_threads() == threads


def test_preset_table_matches_count_parameters():
    from numpygpt.config import GPTConfig, count_parameters

    page = SOURCES[ROOT / "docs" / "model.md"]
    rows = re.findall(r"^\| `([\w-]+)`[^|]*\|(.*)\|\s*$", page, re.M)
    presets = {name: cells for name, cells in rows if name in ("gpt2-small", "gpt2-medium", "gpt2-large",
                                                              "gpt2-xl", "tiny")}
    assert len(presets) == 5
    for name, cells in presets.items():
        counts = [int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3})+", cells)]
        expected = [count_parameters(GPTConfig.preset(name, qkv_bias=bias), tied=tied)
                    for bias in (False, True) for tied in (False, True)]
        assert counts == expected, name


def update(path: Path) -> None:
    """Rewrite the Output blocks of ``path`` with what its snippets print now (snippets that
    already show an output, and every snippet of docs/backward.md)."""
    markdown = path.read_text(encoding="utf-8")
    parts, last = [], 0
    for i, m in enumerate(snippets(markdown)):
        if NOT_RUN.match(m["code"]) or (m["text"] is None and path.resolve() != BACKWARD):
            continue
        printed = run_snippet(m["code"], f"snippet {i}")
        parts += [markdown[last:m.start()], f"```python\n{m['code']}```\n\nOutput:\n\n```text\n{printed}```"]
        last = m.end()
    parts.append(markdown[last:])
    path.write_text("".join(parts), encoding="utf-8")


if __name__ == "__main__":
    update(Path(sys.argv[1]) if len(sys.argv) > 1 else BACKWARD)
