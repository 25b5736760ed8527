"""MkDocs hooks (mkdocs.yml names this file): the site's front page is README.md.

README.md sits outside docs/ and links to the guides as ``docs/<guide>.md`` (right on GitHub).
``on_files`` adds it to the site as ``index.md`` with those links made relative to docs/; a link
to a file outside docs/ (``benchmarks/RESULTS.md``) becomes its path in code, since the site has
no page for it.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

LINK = re.compile(r"\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def readme_as_index(markdown: str) -> str:
    """README.md's text with its links rewritten for a page at the root of docs/."""

    def link(m: re.Match) -> str:
        text, target = m["text"], m["target"]
        if target.startswith(("http://", "https://", "#")):
            return m[0]
        if target.startswith("docs/"):
            return f"[{text}]({target[len('docs/'):]})"
        return text if target in text else f"{text} (`{target}`)"

    return LINK.sub(link, markdown)


def on_files(files, config):
    readme = Path(config["config_file_path"]).parent / "README.md"
    files.append(File.generated(config, "index.md", content=readme_as_index(readme.read_text(encoding="utf-8"))))
    return files
