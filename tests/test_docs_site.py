"""The documentation site builds with `mkdocs build --strict`: a broken link or anchor, a guide
missing from mkdocs.yml's nav, or a docstring mkdocstrings cannot read fails the build, and so
this test. MkDocs is in the `test` extra; without it the test fails rather than skips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mkdocs_hooks import readme_as_index  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "pymdownx"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"{module} is missing: pip install -e '.[test]' (or '.[docs]') installs the site's tools")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_front_page_is_the_readme_with_links_to_the_guides(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "The model in ten lines" in index
    for guide in ("pretraining", "lora", "mpi", "backward"):
        assert f'href="{guide}/"' in index, guide


def test_the_api_reference_is_generated_from_the_docstrings(site):
    page = (site / "reference" / "nn" / "index.html").read_text(encoding="utf-8")
    for name in ("normalization.LayerNorm", "attention.MultiHeadAttention", "blockwise_attention.BlockwiseAttention",
                 "loss.CrossEntropyLoss", "fused_loss.FusedLinearCrossEntropy", "lora.LoRALinear"):
        assert f'id="numpygpt.nn.{name}"' in page, name


def test_readme_links_are_rewritten_for_the_site():
    text = "[LoRA](docs/lora.md), [`benchmarks/RESULTS.md`](benchmarks/RESULTS.md), [x](https://a.b/c), [y](#z)"
    assert readme_as_index(text) == "[LoRA](lora.md), `benchmarks/RESULTS.md`, [x](https://a.b/c), [y](#z)"
    assert readme_as_index("[the script](examples/x.py)") == "the script (`examples/x.py`)"


def test_the_derivations_are_math_for_mathjax(site):
    """arithmatex wraps every $...$ and $$...$$ of the docstrings for MathJax; a `$` left over
    outside them would be shown to the reader as a dollar sign."""
    import re

    page = (site / "reference" / "nn" / "index.html").read_text(encoding="utf-8")
    blocks = re.findall(r'<div class="arithmatex">(.*?)</div>', page, re.S)
    assert any(r"\operatorname{mean}(g \odot \hat{x})" in b for b in blocks), "LayerNorm's dx"
    assert any(r"\frac{p_n - \operatorname{onehot}(t_n)}{N}" in b for b in blocks), "cross-entropy's dz"
    assert len(re.findall(r'<span class="arithmatex">', page)) > 50
    prose = re.sub(r'<(script|style|code|pre)\b.*?</\1>|<(span|div) class="arithmatex">.*?</\2>', "", page, flags=re.S)
    assert "$" not in prose
