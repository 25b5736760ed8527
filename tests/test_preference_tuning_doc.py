"""docs/preference-tuning.md runs: every ```python block executes (each asserts its own checks)
and prints what the ```text block after it shows, numbers aside. Regenerate the outputs with

    PYTHONPATH=. python tests/test_docs.py docs/preference-tuning.md
"""

from pathlib import Path

import pytest

from test_docs import run_snippet, skeleton, snippets

PAGE = Path(__file__).resolve().parents[1] / "docs" / "preference-tuning.md"
SNIPPETS = snippets(PAGE.read_text(encoding="utf-8"))


def test_the_guide_has_checked_snippets():
    assert len(SNIPPETS) == 3
    for m in SNIPPETS:
        assert "assert " in m["code"] and m["text"] is not None


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_and_prints_what_the_guide_shows(index):
    m = SNIPPETS[index]
    assert skeleton(run_snippet(m["code"], f"preference-tuning.md snippet {index}")) == skeleton(m["text"])
