"""Atomic file writes and the one safetensors writer, for checkpoints and pretrained weights.

    with atomic_write("runs/ckpt.safetensors") as fh:
        fh.write(...)                        # lands in .ckpt.safetensors.<pid>.<random>.numpygpt-tmp
    write_safetensors(path, [(name, array), ...], metadata={"k": "v"})

The bytes go to a temporary file in the target's directory, named
``.<target>.<pid>.<random>.numpygpt-tmp`` so it can be recognised; it is flushed and
fsync'ed, given the mode an ordinary new file gets (umask applied: mkstemp would leave
it owner-only), renamed over the target, and the directory is fsync'ed so the rename
itself survives a crash. On any error the temporary file is removed and an existing
target is untouched. A process killed mid-write (SIGKILL, power loss) cannot clean up:
``remove_stale_temps(target)`` deletes the temporaries of ``target`` left by processes
that no longer run, and every ``atomic_write`` calls it first.

Versions before 2026-11-23 named the temporary ``<target>.<8 random characters>.tmp``
(``tempfile.mkstemp``), with no pid in it: ``remove_stale_temps`` also deletes those, once
they are ``LEGACY_TEMP_AGE_S`` old (a live writer touches its file every few seconds; an
old-style file unchanged for 10 minutes was left by a process that died).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
from contextlib import contextmanager

import numpy

from . import backend

__all__ = ["atomic_write", "write_json", "remove_stale_temps", "write_safetensors", "SAFETENSORS_DTYPES", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".numpygpt-tmp"
LEGACY_TEMP_AGE_S = 600.0  # an old-style temporary unchanged this long is stale
SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64",
                      "int32": "I32", "uint8": "U8", "uint32": "U32", "uint64": "U64", "bool": "BOOL"}


def _temp_prefix(target: str) -> str:
    return "." + os.path.basename(target) + "."


def _temp_owner(name: str, prefix: str) -> int | None:
    """The pid in a temporary file's name ``<prefix><pid>.<random>.numpygpt-tmp``, or None."""
    if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
        return None
    middle = name[len(prefix):-len(TEMP_SUFFIX)].split(".")
    if len(middle) != 2 or not middle[0].isdigit():
        return None
    return int(middle[0])


def _is_legacy_temp(name: str, target_name: str) -> bool:
    """Whether ``name`` is an old-style temporary of ``target_name``: ``tempfile.mkstemp``'s
    ``<target>.<8 characters of [a-z0-9_]>.tmp``."""
    return re.fullmatch(re.escape(target_name) + r"\.[a-z0-9_]{8}\.tmp", name) is not None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (EPERM)
        return True
    return True


_live_temps: set = set()  # temporaries this process is writing right now


def remove_stale_temps(target) -> list:
    """Delete the temporaries of ``target`` whose writer no longer runs (or, for this
    process, that it is not writing now). Returns the removed paths."""
    target = os.path.abspath(os.fspath(target))
    directory, prefix = os.path.dirname(target), _temp_prefix(target)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        pid = _temp_owner(name, prefix)
        if pid is None:
            if not _is_legacy_temp(name, os.path.basename(target)):
                continue
            try:
                if time.time() - os.path.getmtime(path) < LEGACY_TEMP_AGE_S:
                    continue  # it may still be being written
            except OSError:
                continue
        elif path in _live_temps or (pid != os.getpid() and _process_alive(pid)):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is done anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(target):
    """Yield a binary file in ``target``'s directory; on a clean exit it replaces ``target``
    (durably); on an exception it is removed and ``target`` is untouched. The directory is
    created if needed; stale temporaries of ``target`` are removed first."""
    target = os.path.abspath(os.fspath(target))
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(target)
    tmp = os.path.join(directory, f"{_temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    _live_temps.add(tmp)
    try:
        with open(tmp, "xb") as fh:  # fh.name is the temporary path
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    finally:
        _live_temps.discard(tmp)
    fsync_dir(directory)


def write_safetensors(path, named_arrays, metadata: dict | None = None) -> None:
    """Write ``[(name, array), ...]`` (host or device arrays) as a safetensors file, atomically,
    streaming one tensor at a time to the host so no second copy of the model is made.

    Format: 8-byte little-endian header length N, N bytes of JSON
    ``{name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {str: str}}`` padded
    with spaces so the data start 8-byte aligned, then every tensor's bytes (C order,
    little-endian) back to back.
    """
    named_arrays = list(named_arrays)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, a in named_arrays:
        dt = numpy.dtype(a.dtype)
        if dt.name not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {dt} cannot be written to safetensors")
        nbytes = int(a.size) * dt.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dt.name], "shape": [int(s) for s in a.shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for _, a in named_arrays:
            host = numpy.ascontiguousarray(backend.to_host(a))
            host = host.astype(host.dtype.newbyteorder("<"), copy=False)
            fh.write(host.reshape(-1).view(numpy.uint8))


def write_json(path, obj, indent: int = 4) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically (temporary file, then rename)."""
    with atomic_write(path) as fh:
        fh.write((json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))
