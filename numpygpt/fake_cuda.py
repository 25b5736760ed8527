"""A stand-in for CuPy on the CPU, as strict as CuPy: the GPU path checked without a GPU.

    from numpygpt import backend
    backend.set_device("fake-cuda")          # tests only (or NUMPYGPT_DEVICE=fake-cuda)
    x = backend.xp.ones(3)                   # a FakeArray: NumPy underneath
    numpy.asarray(x)                         # TypeError, as with CuPy
    x + numpy.ones(3)                        # TypeError, as with CuPy
    with fake_cuda.count_transfers() as log:
        float(x.sum())                       # allowed, as in CuPy, but a host transfer
    assert log.total == 1, log.report()

Its arrays compute with NumPy and refuse what CuPy refuses (CuPy 13's ``cupy/_core``):
- implicit conversion to NumPy: ``numpy.asarray(x)`` and ``x.__array__()`` raise
  TypeError with CuPy's message; so does a NumPy function that is not dispatched;
- a NumPy array (0-d included) as an operand of an operator, a ufunc or an ``xp``
  function, or written into a slice (``x[:2] = host``): TypeError. Host data enters
  only through ``xp.asarray``/``xp.array`` (and as fancy indices or values of a fancy
  assignment, which CuPy copies to the device too);
- reductions and scalar indexing return 0-d arrays, never NumPy scalars, so a value
  stays "on the device" until something asks for it.
Out-of-range fancy indices raise IndexError here (NumPy's check), where CuPy would wrap
them silently: ids that reach the device must be checked before (the model does, on the
host).

Like CuPy, ``float(x)``, ``int(x)``, ``bool(x)``, ``x.item()``, ``x.tolist()``,
``format(x)`` and ``repr(x)`` work: CuPy implements each with ``self.get()``, a
synchronising device-to-host copy. So they are allowed and counted, as "implicit"
transfers, beside the explicit ones (``x.get()``, which ``backend.to_host`` calls).
``count_transfers()`` records both, with the line of library code that asked, so a
test can hold a training step or a generated token to a budget.

NumPy functions called on a FakeArray are dispatched (NEP 18 and ``__array_ufunc__``)
and return FakeArrays, as CuPy does. What this cannot see: kernels' asynchrony (every
operation here is done when it returns) and CuPy's own dtype promotion quirks.
"""

from __future__ import annotations

import contextlib
import threading
import traceback

import numpy

__all__ = ["FakeArray", "xp", "count_transfers", "TransferLog", "default_rng", "scatter_add", "DEVICE"]

DEVICE = "fake-cuda"
_IMPLICIT_MESSAGE = ("Implicit conversion to a NumPy array is not allowed. "
                     "Please use `.get()` to construct a NumPy array explicitly.")


# -- counting host transfers --------------------------------------------------------------------

class TransferLog:
    """The device-to-host transfers seen while it was active: ``events`` is a list of
    (kind, where) with kind "get" (explicit) or "implicit" (float, int, bool, item...)."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    @property
    def total(self) -> int:
        return len(self.events)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.events if k == kind)

    def report(self) -> str:
        """One line a transfer: kind and the first frame outside this module."""
        lines = [f"{len(self.events)} host transfer(s):"]
        lines += [f"  {kind:8s} {where}" for kind, where in self.events]
        return "\n".join(lines)


_active: list[TransferLog] = []
_lock = threading.Lock()


@contextlib.contextmanager
def count_transfers():
    """``with count_transfers() as log: ...``: every device-to-host transfer in the block."""
    log = TransferLog()
    with _lock:
        _active.append(log)
    try:
        yield log
    finally:
        with _lock:
            _active.remove(log)


_NOT_THE_CALLER = (__file__, __file__.replace("fake_cuda.py", "backend.py"))


def _caller() -> str:
    """The line that asked for the transfer: the first frame outside this module and backend."""
    for frame in reversed(traceback.extract_stack(limit=12)[:-2]):
        if frame.filename not in _NOT_THE_CALLER:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"  # pragma: no cover


def _record(kind: str) -> None:
    if _active:
        where = _caller()
        with _lock:
            for log in _active:
                log.events.append((kind, where))


# -- wrapping and unwrapping -------------------------------------------------------------------

def _mixing_error(obj) -> TypeError:
    return TypeError(f"Unsupported type {type(obj)} (fake-cuda, as CuPy: a host array cannot meet a device "
                     "array; move it with backend.to_device first)")


def _unwrap(obj):
    """FakeArrays -> their NumPy arrays, in lists and tuples too; a NumPy array is refused."""
    if isinstance(obj, FakeArray):
        return obj._a
    if isinstance(obj, numpy.ndarray):
        raise _mixing_error(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    return obj


def _unwrap_kwargs(kwargs: dict) -> dict:
    return {k: _unwrap(v) for k, v in kwargs.items()}


def _wrap(obj):
    """NumPy results -> FakeArrays (NumPy scalars become 0-d arrays, as CuPy returns)."""
    if isinstance(obj, numpy.ndarray):
        return FakeArray(obj)
    if isinstance(obj, numpy.generic):
        return FakeArray(numpy.asarray(obj))
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list):
        return [_wrap(o) for o in obj]
    return obj


def _call(fn, args, kwargs):
    """fn on unwrapped arguments; a FakeArray given as ``out`` is returned itself."""
    out = kwargs.get("out")
    result = fn(*_unwrap(args), **_unwrap_kwargs(kwargs))
    if isinstance(out, FakeArray):
        return out
    return _wrap(result)


def _has_array(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (numpy.ndarray, FakeArray, list)) for k in keys)


def _has_mask(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, numpy.ndarray) and k.dtype == bool for k in keys)


def _index(key):
    """An index for the NumPy array underneath: device arrays unwrapped, host arrays and
    lists allowed (CuPy copies them to the device)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, FakeArray):
        return key._a
    return key


# -- the array ---------------------------------------------------------------------------------

class _Pointer:
    def __init__(self, a: numpy.ndarray):
        self.ptr = a.ctypes.data


class FakeArray:
    """An array "on the fake device": a NumPy array that behaves like a CuPy one."""

    __slots__ = ("_a",)
    __hash__ = None  # an array, like ndarray and cupy.ndarray

    def __init__(self, a: numpy.ndarray):
        self._a = a

    # -- what stays on the device ----------------------------------------------------------

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: FakeArray(self._a.T))
    base = property(lambda self: None if self._a.base is None else FakeArray(numpy.asarray(self._a.base)))
    data = property(lambda self: _Pointer(self._a))  # cupy.ndarray.data.ptr: the device address
    device = property(lambda self: DEVICE)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key):
        key = _index(key)
        if _has_mask(key):
            _record("implicit")  # CuPy sizes a boolean-mask read with nonzero(): a sync
        result = self._a[key]
        if isinstance(result, numpy.generic):  # a full integer index: CuPy gives a 0-d view
            key_t = key if isinstance(key, tuple) else (key,)
            result = self._a[key_t + (Ellipsis,)]
        return FakeArray(result)

    def __setitem__(self, key, value):
        if isinstance(value, (numpy.ndarray, list)):
            if not _has_array(key):
                raise _mixing_error(value)  # CuPy's elementwise copy into a slice takes device data only
            self._a[_index(key)] = value  # a fancy assignment: CuPy copies the host values over
        else:
            self._a[_index(key)] = _unwrap(value)

    def __getattr__(self, name):
        if name in ("ctypes", "tofile", "dump", "dumps", "tobytes", "__array_interface__", "__array_struct__"):
            raise AttributeError(f"a fake-cuda array has no host-side {name!r} (neither has cupy.ndarray)")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            if name in _SIZED_BY_DATA:
                _record("implicit")
            out = kwargs.get("out")
            result = attr(*_unwrap(args), **_unwrap_kwargs(kwargs))
            if result is self._a:
                return self
            if isinstance(out, FakeArray):
                return out
            return _wrap(result)

        return method

    def copy(self, order="C"):
        return FakeArray(self._a.copy(order=order))

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    # -- what leaves the device ------------------------------------------------------------

    def get(self, stream=None, order="C", out=None):
        """A NumPy copy: the explicit host transfer (``backend.to_host`` calls this)."""
        _record("get")
        host = numpy.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, host, stream=None):
        """Copy a NumPy array of the same shape in (host to device: not counted)."""
        if not isinstance(host, numpy.ndarray) or host.shape != self._a.shape:
            raise ValueError("set() needs a NumPy array of the same shape")
        self._a[...] = host

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT_MESSAGE)

    def _implicit(self):
        _record("implicit")
        return self._a

    def __float__(self):
        return float(self._implicit())

    def __int__(self):
        return int(self._implicit())

    def __complex__(self):
        return complex(self._implicit())

    def __bool__(self):
        return bool(self._implicit())

    def item(self, *args):
        return self._implicit().item(*args)

    def tolist(self):
        return self._implicit().tolist()

    def __format__(self, spec):
        return format(self._implicit()[()] if self._a.ndim == 0 else self._implicit(), spec)

    def __repr__(self):
        return "fake-cuda " + repr(self._implicit())

    def __str__(self):
        return str(self._implicit())

    # -- NumPy's dispatch protocols ------------------------------------------------------------

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            outs = kwargs["out"]
            kwargs["out"] = tuple(_unwrap(o) for o in outs)
            result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
            return outs[0] if len(outs) == 1 and isinstance(outs[0], FakeArray) else _wrap(result)
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap_kwargs(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        return _call(func, args, kwargs)


def _binary(ufunc):
    def op(self, other):
        return _wrap(ufunc(self._a, _unwrap(other)))

    def rop(self, other):
        return _wrap(ufunc(_unwrap(other), self._a))

    def iop(self, other):
        ufunc(self._a, _unwrap(other), out=self._a)
        return self

    return op, rop, iop


for _name, _ufunc in [("add", numpy.add), ("sub", numpy.subtract), ("mul", numpy.multiply),
                      ("truediv", numpy.true_divide), ("floordiv", numpy.floor_divide), ("mod", numpy.remainder),
                      ("pow", numpy.power), ("matmul", numpy.matmul), ("and", numpy.bitwise_and),
                      ("or", numpy.bitwise_or), ("xor", numpy.bitwise_xor), ("lshift", numpy.left_shift),
                      ("rshift", numpy.right_shift)]:
    _op, _rop, _iop = _binary(_ufunc)
    setattr(FakeArray, f"__{_name}__", _op)
    setattr(FakeArray, f"__r{_name}__", _rop)
    setattr(FakeArray, f"__i{_name}__", _iop)

for _name, _ufunc in [("eq", numpy.equal), ("ne", numpy.not_equal), ("lt", numpy.less),
                      ("le", numpy.less_equal), ("gt", numpy.greater), ("ge", numpy.greater_equal)]:
    setattr(FakeArray, f"__{_name}__", _binary(_ufunc)[0])

for _name, _ufunc in [("neg", numpy.negative), ("pos", numpy.positive), ("abs", numpy.absolute),
                      ("invert", numpy.invert)]:
    setattr(FakeArray, f"__{_name}__", lambda self, _u=_ufunc: FakeArray(_u(self._a)))


# -- the module: ``xp`` on the fake device ----------------------------------------------------------

_FROM_HOST = frozenset({"array", "asarray", "asanyarray"})  # where host data may enter
# functions whose output size depends on the data: CuPy copies a count to the host first
_SIZED_BY_DATA = frozenset({"nonzero", "flatnonzero", "argwhere", "unique", "extract", "compress"})


class _Ufunc:
    """A NumPy ufunc that takes and returns FakeArrays (and refuses host arrays)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _call(self._ufunc, args, kwargs)

    def __getattr__(self, name):  # reduce, accumulate, outer, at...
        attr = getattr(self._ufunc, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: _call(attr, args, kwargs)


def _unwrap_any(obj):
    """FakeArrays unwrapped anywhere in ``obj`` (a list of them is fine), host data kept."""
    if isinstance(obj, FakeArray):
        return obj._a
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap_any(o) for o in obj)
    return obj


def _from_host(fn):
    def create(obj, *args, **kwargs):
        if isinstance(obj, FakeArray):
            result = fn(obj._a, *args, **kwargs)
            return obj if result is obj._a else FakeArray(result)
        # host -> device is a copy: changing the host array later changes nothing here
        return FakeArray(numpy.array(fn(_unwrap_any(obj), *args, **kwargs), copy=True))

    return create


class _Module:
    """``numpy`` (or one of its submodules) as CuPy would be: FakeArrays in and out."""

    ndarray = FakeArray

    def __init__(self, module):
        self._module = module
        self.__name__ = f"numpygpt.fake_cuda({module.__name__})"

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if isinstance(attr, numpy.ufunc):
            wrapped = _Ufunc(attr)
        elif isinstance(attr, type(numpy)):
            wrapped = _Module(attr)
        elif isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, finfo, constants: shared with NumPy, as in CuPy
        elif name in _FROM_HOST:
            wrapped = _from_host(attr)
        else:
            def wrapped(*args, _fn=attr, _sync=name in _SIZED_BY_DATA, **kwargs):
                if _sync:
                    _record("implicit")
                return _call(_fn, args, kwargs)
        setattr(self, name, wrapped)  # looked up once
        return wrapped


xp = _Module(numpy)


# -- what backend wraps ------------------------------------------------------------------------

class _Generator:
    """``cupy.random.default_rng`` on the fake device: NumPy's generator, FakeArrays out."""

    def __init__(self, seed):
        self._rng = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        attr = getattr(self._rng, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: _call(attr, args, kwargs)


def default_rng(seed) -> _Generator:
    return _Generator(seed)


def scatter_add(dst: FakeArray, ids, src) -> None:
    """``cupyx.scatter_add``: dst[ids[n]] += src[n] for every n, repeats counted."""
    numpy.add.at(dst._a, _index(ids), _unwrap(src))
