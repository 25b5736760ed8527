"""docs/translation.md runs: its ```python blocks execute (each asserts its own checks) and
print what the page shows, numbers aside, as tests/test_docs.py does for backward.md.
Regenerate the outputs with

    PYTHONPATH=. python tests/test_docs.py docs/translation.md
"""

from test_docs import ROOT, run_snippet, skeleton, snippets

PAGE = ROOT / "docs" / "translation.md"


def test_guide_snippets_run_and_print_what_the_page_shows():
    found = snippets(PAGE.read_text(encoding="utf-8"))
    assert found, "the guide has no runnable snippet"
    for i, m in enumerate(found):
        assert "assert " in m["code"] and m["text"] is not None
        assert skeleton(run_snippet(m["code"], f"translation.md snippet {i}")) == skeleton(m["text"])
