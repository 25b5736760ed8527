"""Reading a Hugging Face checkpoint's safetensors files tensor by tensor, bfloat16 included.

    files = WeightFiles(directory)      # model.safetensors, or the shards its index names
    files.shape("model.norm.weight")    # from the headers: nothing read yet
    w = files.read("model.norm.weight") # one tensor, float32 or float64, as a NumPy array

The ``safetensors`` package reads into NumPy only dtypes NumPy has, and NumPy has no
bfloat16, the dtype Llama 3 and Qwen3 are published in. The format is simple enough to
read directly: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the tensors' bytes.
A bfloat16 is the top half of a float32, so ``uint16 << 16`` viewed as float32 is exact.
Each tensor is read on its own, so loading never holds more than the model plus one
tensor (and its float32 conversion).
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_NUMPY_DTYPES = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16, "BF16": numpy.uint16}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class WeightFiles:
    """The tensors of ``directory``: ``model.safetensors``, or the shards listed by
    ``model.safetensors.index.json``. Headers are read and checked when this is made
    (ValueError naming the file for a damaged one); tensor data only by ``read``."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self._entries = {}  # tensor name -> (path, data start, header entry)
        single, index = (os.path.join(self.directory, n) for n in (WEIGHTS_FILE, INDEX_FILE))
        if os.path.isfile(single):
            paths = [single]
        elif os.path.isfile(index):
            paths = self._shards(index)
        else:
            raise FileNotFoundError(f"{self.directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
        for path in paths:
            for name, (start, entry) in _read_header(path).items():
                if name in self._entries:
                    raise ValueError(f"tensor {name!r} appears in both {self._entries[name][0]} and {path}")
                self._entries[name] = (path, start, entry)

    def _shards(self, index_path: str) -> list:
        """The shard files an index names (each once, in the directory itself)."""
        try:
            with open(index_path, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index_path} is not a safetensors index (a JSON object with a weight_map): {e}") from e
        for name in names:
            if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".safetensors"):
                raise ValueError(f"{index_path} names the shard {name!r}: shards must be .safetensors files "
                                 "in the same directory")
            if not os.path.isfile(os.path.join(self.directory, name)):
                raise FileNotFoundError(f"{index_path} names the shard {name}, which is missing")
        return [os.path.join(self.directory, n) for n in names]

    def keys(self) -> list:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        return tuple(self._entries[name][2]["shape"])

    def dtype(self, name: str) -> str:
        """The file's dtype code: "BF16", "F16", "F32" or "F64"."""
        return self._entries[name][2]["dtype"]

    def read(self, name: str):
        """The tensor as a host array: float64 stays float64, every other float becomes float32."""
        path, start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        count = math.prod(entry["shape"])
        with open(path, "rb") as fh:
            fh.seek(start + begin)
            raw = numpy.fromfile(fh, dtype=numpy.dtype(_NUMPY_DTYPES[entry["dtype"]]).newbyteorder("<"), count=count)
        if raw.size != count:
            raise ValueError(f"{path}: tensor {name!r} is truncated ({raw.size} of {count} values)")
        if entry["dtype"] == "BF16":
            raw = (raw.astype(numpy.uint32) << 16).view(numpy.float32)  # bfloat16 = a float32's top 16 bits
        elif entry["dtype"] == "F16":
            raw = raw.astype(numpy.float32)
        return raw.reshape(entry["shape"])


def _read_header(path: str) -> dict:
    """{name: (absolute start of the data section, entry)} of one safetensors file, checked:
    known float dtypes, offsets that match the shapes and lie inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path} is not a safetensors file: its header length is missing or too large")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; numpygpt reads "
                             f"{', '.join(_NUMPY_DTYPES)} weights")
        itemsize = numpy.dtype(_NUMPY_DTYPES[dtype]).itemsize
        if end - begin != math.prod(shape) * itemsize or not 0 <= begin <= end <= size - 8 - n:
            raise ValueError(f"{path}: tensor {name!r} has data offsets {[begin, end]} that do not fit its "
                             f"shape {shape} or the file ({size} bytes): truncated or corrupt")
        entries[name] = (8 + n, {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]})
    return entries
