"""docs/gpu.md and docs/mpi-zero.md run: every ```python block executes (each asserts its own
checks) and prints what the ```text block after it shows, numbers aside (test_docs' rules)."""

from pathlib import Path

import pytest

from test_docs import run_snippet, skeleton, snippets

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [(page, i, m) for page in ("gpu.md", "mpi-zero.md")
          for i, m in enumerate(snippets((DOCS / page).read_text(encoding="utf-8")))]


def test_each_guide_has_checked_snippets():
    for page in ("gpu.md", "mpi-zero.md"):
        mine = [m for p, _, m in BLOCKS if p == page]
        assert mine, page
        assert all("assert " in m["code"] and m["text"] is not None for m in mine), page


@pytest.mark.parametrize("page,index,match", BLOCKS, ids=[f"{p}:{i}" for p, i, _ in BLOCKS])
def test_snippet_runs_and_prints_what_the_guide_shows(page, index, match):
    from numpygpt import backend

    with backend.device("cpu"):
        printed = run_snippet(match["code"], f"{page}:{index}")
    assert skeleton(printed) == skeleton(match["text"])
