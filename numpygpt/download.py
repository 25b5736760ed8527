"""Downloads into a local cache: GPT-2 files from the Hugging Face hub, atomically.

    download_file(url, dest, verify=check)     # dest appears only complete and verified
    fetch_hub_files("gpt2", directory, [("config.json", check_config), ...])

Only ``numpygpt.pretrained`` calls this, for names like 'gpt2'; a directory given by the
user never touches the network.
"""

from __future__ import annotations

import os
from urllib.request import Request, urlopen  # looked up at call time, so tests can fake the hub

from .fileio import atomic_write

__all__ = ["HUB_URL", "HUB_NAMES", "default_cache_dir", "download_file", "fetch_hub_files"]

HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def default_cache_dir() -> str:
    return os.environ.get("NUMPYGPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "numpygpt")


def download_file(url: str, dest: str, verify=None, chunk_size: int = 1 << 20) -> None:
    """Download ``url`` to ``dest`` with a progress bar, atomically.

    The bytes go to a temporary file next to ``dest``; its size is checked against the
    HTTP Content-Length, ``verify(tmp_path)`` may reject it, and only then is it renamed
    to ``dest``, so an interrupted or bad download never looks like a cached file.
    """
    from tqdm import tqdm

    request = Request(url, headers={"User-Agent": "numpygpt"})
    with atomic_write(dest) as fh:
        with urlopen(request, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            written = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
                while chunk := response.read(chunk_size):
                    fh.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        if total is not None and written != total:
            raise OSError(f"download of {url} stopped after {written} of {total} bytes")
        fh.flush()
        if verify is not None:
            verify(fh.name)


def fetch_hub_files(name: str, directory: str, files) -> None:
    """Download whichever of ``files`` ([(file name, verify or None)], in order) the cache
    ``directory`` lacks, from the hub's openai-community/``name``. Raises URLError/OSError
    or whatever ``verify`` raises."""
    os.makedirs(directory, exist_ok=True)
    for file, verify in files:
        dest = os.path.join(directory, file)
        if not os.path.isfile(dest):
            download_file(HUB_URL.format(name=name, file=file), dest, verify=verify)

