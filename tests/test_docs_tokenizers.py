"""docs/tokenizers.md runs: its ```python blocks execute in order, in one namespace, in an
empty directory (each checks itself with asserts)."""

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tokenizers.md"


def test_the_guide_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "tokenizers_guide"}
    for i, code in enumerate(blocks):
        assert "assert" in code or "print" in code, f"block {i} shows nothing"
        exec(compile(code, f"docs/tokenizers.md block {i}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "refused:" in printed and "has 515 tokens but the model's vocab_size is 128256" in printed
