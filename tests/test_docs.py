"""docs/backward.md runs: every ```python block executes (each asserts its own checks), and
what it prints matches the ```text block shown after it, numbers aside (they differ in the
last digits from machine to machine). After editing the page, regenerate its outputs with

    PYTHONPATH=. python tests/test_docs.py docs/backward.md
"""

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "backward.md"
# a ```python block, optionally followed by "Output:" and a ```text block
BLOCK = re.compile(r"```python\n(?P<code>.*?)```(?P<out>\n\nOutput:\n\n```text\n(?P<text>.*?)```)?", re.S)
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def snippets(markdown: str):
    return list(BLOCK.finditer(markdown))


def run_snippet(code: str, name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), {"__name__": name})
    return out.getvalue()


def skeleton(text: str) -> str:
    """The printed text with every number replaced by '#' and runs of spaces squeezed."""
    return re.sub(r"[ \t]+", " ", NUMBER.sub("#", text)).strip()


def _heading_before(markdown: str, pos: int) -> str:
    headings = re.findall(r"^## (.+)$", markdown[:pos], re.M)
    return headings[-1] if headings else "top"


SOURCE = PAGE.read_text(encoding="utf-8")
SNIPPETS = snippets(SOURCE)


def test_every_section_has_a_checked_snippet():
    sections = re.findall(r"^## (.+)$", SOURCE, re.M)
    expected = ["Cross-entropy", "output head", "LayerNorm", "residual", "MLP and GELU", "Attention",
                "embeddings", "whole model", "Llama block", "RMSNorm", "Rotary", "SwiGLU", "Grouped-query",
                "Llama and Qwen3 model"]
    for word in expected:
        assert any(word in s for s in sections), word
    covered = {_heading_before(SOURCE, m.start()) for m in SNIPPETS}
    for section in sections[1:]:  # the first section introduces the notation
        assert section in covered, f"section {section!r} has no runnable snippet"
    for m in SNIPPETS:
        assert "assert " in m["code"], f"a snippet in {_heading_before(SOURCE, m.start())!r} checks nothing"
        assert m["text"] is not None, f"a snippet in {_heading_before(SOURCE, m.start())!r} shows no output"


@pytest.mark.parametrize("index", range(len(SNIPPETS)),
                         ids=[_heading_before(SOURCE, m.start()).split(",")[0] for m in SNIPPETS])
def test_snippet_runs_and_prints_what_the_page_shows(index):
    m = SNIPPETS[index]
    printed = run_snippet(m["code"], f"backward.md snippet {index}")
    assert skeleton(printed) == skeleton(m["text"])


def test_skeleton_ignores_digits_but_not_words():
    assert skeleton("err 1.5e-10 True") == skeleton("err  2e-9 True")
    assert skeleton("err 1.5e-10 True") != skeleton("err 1.5e-10 False")


def test_readme_preset_table_matches_count_parameters():
    from numpygpt.config import GPTConfig, count_parameters

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([\w-]+)`[^|]*\|(.*)\|\s*$", readme, re.M)
    presets = {name: cells for name, cells in rows if name in ("gpt2-small", "gpt2-medium", "gpt2-large",
                                                              "gpt2-xl", "tiny")}
    assert len(presets) == 5
    for name, cells in presets.items():
        counts = [int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3})+", cells)]
        expected = [count_parameters(GPTConfig.preset(name, qkv_bias=bias), tied=tied)
                    for bias in (False, True) for tied in (False, True)]
        assert counts == expected, name


def update(path: Path) -> None:
    """Rewrite the Output blocks of ``path`` with what its snippets print now."""
    markdown = path.read_text(encoding="utf-8")
    parts, last = [], 0
    for i, m in enumerate(snippets(markdown)):
        printed = run_snippet(m["code"], f"snippet {i}")
        parts += [markdown[last:m.start()], f"```python\n{m['code']}```\n\nOutput:\n\n```text\n{printed}```"]
        last = m.end()
    parts.append(markdown[last:])
    path.write_text("".join(parts), encoding="utf-8")


if __name__ == "__main__":
    update(Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE)
