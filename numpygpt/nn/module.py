"""Parameter and Module: the contract every layer follows.

    y = layer(x)              # same as layer.forward(x); keeps what backward needs
    dx = layer.backward(dy)   # returns dL/dx and ADDS dL/dW into W.grad
    model.zero_grad()         # clears every .grad

Gradients are added, never assigned, so a weight used twice (the tied token
embedding and output head) or a gradient accumulated over micro-batches comes out
right without special cases.
"""

from __future__ import annotations

from contextlib import contextmanager

from .. import backend

_grad_enabled = True


@contextmanager
def no_grad():
    """Inside this block forward passes keep no cache (evaluation, generation), and leave
    alone the cache an earlier forward kept: its backward still runs, unchanged."""
    global _grad_enabled
    before = _grad_enabled
    _grad_enabled = False
    try:
        yield
    finally:
        _grad_enabled = before


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextmanager
def eval_mode(model):
    """Inside this block ``model`` and every submodule are in eval mode (no dropout);
    afterwards each module is back in the mode it was in, a mixed state included."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


_init_enabled = True


@contextmanager
def skip_init():
    """Layers built inside this block leave their weights as zeros instead of drawing
    random ones (GPTModel does its own initialisation, or loads a checkpoint)."""
    global _init_enabled
    before = _init_enabled
    _init_enabled = False
    try:
        yield
    finally:
        _init_enabled = before


def normal_init(shape, std: float, dtype, seed=None):
    """N(0, std) weights drawn on the host in float32 and moved to the device, or zeros
    inside skip_init()."""
    if not _init_enabled:
        return backend.xp.zeros(shape, dtype=dtype)
    w = backend.host_rng(seed).standard_normal(shape, dtype="float32")
    w *= std
    return backend.to_device(w, dtype=dtype)


class Parameter:
    """An array of weights and the gradient that backward passes add into it."""

    def __init__(self, data, requires_grad: bool = True):
        self.data = data
        self.grad = None  # allocated by the first add_grad, dropped by zero_grad
        self.requires_grad = requires_grad
        self._owns_grad = False  # grad is a buffer grad_buffer allocated (reusable), not an adopted array
        self._spare = None  # the buffer zero_grad let go of, refilled by the next grad_buffer

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    def add_grad(self, g) -> None:
        """grad += g. ``g`` must be a freshly computed array: the first call adopts it."""
        if not self.requires_grad:
            return
        if g.dtype != self.data.dtype:
            g = g.astype(self.data.dtype)
        if self.grad is None:
            self.grad = g
            self._owns_grad = False
        else:
            self.grad += g

    def grad_buffer(self):
        """The gradient array to add into in place (zeros on first use), for backward
        passes that scatter into it, like the embedding's.

        The array that ``zero_grad`` let go of is zeroed and reused: a fresh (V, C)
        ``zeros`` of the token embedding is page-faulted in (and zeroed by the kernel)
        wherever the scatter touches it, which cost ~10% of a GPT-2 training step.
        """
        if self.grad is None:
            spare, self._spare = self._spare, None
            if spare is not None and spare.shape == self.data.shape and spare.dtype == self.data.dtype:
                spare.fill(0)
                self.grad = spare
            else:
                self.grad = backend.array_module(self.data).zeros(self.data.shape, dtype=self.data.dtype)
            self._owns_grad = True
        return self.grad

    def zero_grad(self) -> None:
        """grad = None (zero). A buffer that grad_buffer allocated (the embeddings') is
        kept and refilled by the next backward, so copy such a .grad if you keep it
        across steps."""
        if self.grad is not None and self._owns_grad:
            self._spare = self.grad
        self._owns_grad = False
        self.grad = None

    def __repr__(self) -> str:
        flag = "" if self.requires_grad else ", frozen"
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}{flag})"


class Module:
    """Base class: parameters, children, train/eval and the cache check.

    Children are found from the instance's attributes: a Parameter, a Module, or a
    list of Modules (named by index, e.g. ``h.0.attn``), so dotted names follow the
    attribute names and map one-to-one to GPT-2's checkpoint names.
    """

    training = True
    _cache = None  # what the last forward with gradients kept for its backward (see _save)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the cache that forward leaves for backward ----------------------------------

    def _save(self, **arrays) -> None:
        """Keep what backward needs (only when gradients are enabled). Everything the
        backward reads from its forward goes here, never into another attribute: a
        ``no_grad`` forward in between (an evaluation) keeps nothing and replaces nothing,
        so the pending backward sees its own forward's state."""
        if _grad_enabled:
            self._cache = arrays

    def _save_more(self, **arrays) -> None:
        """Add to the cache this forward kept with ``_save`` (a subclass's extra arrays);
        nothing under no_grad, where the cache is still the pending forward's."""
        if _grad_enabled:
            self._cache.update(arrays)

    def _take(self) -> dict:
        """Hand the cache to backward and drop it, freeing the activations."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a cached forward pass: "
                "call forward first (outside no_grad()), and backward once per forward"
            )
        self._cache = None
        return cache

    # -- children and parameters --------------------------------------------------------

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "", _seen=None):
        """(dotted name, Parameter) pairs; a shared Parameter appears once, under its first name."""
        seen = set() if _seen is None else _seen
        for name, value in vars(self).items():
            if isinstance(value, Parameter) and id(value) not in seen:
                seen.add(id(value))
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".", seen)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def modules(self):
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    @property
    def device(self) -> str:
        """'cpu' or 'cuda': where this module's parameters live (the current device if it has none)."""
        for p in self.parameters():
            return backend.device_of(p.data)
        return backend.get_device()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def freeze(self, *prefixes: str) -> None:
        """Stop gradients for the components named (all if none): "h.1" is block 1 and
        everything in it, never block 11."""
        for name, p in self.named_parameters():
            if _in_components(name, prefixes):
                p.requires_grad = False
                p.grad = None

    def unfreeze(self, *prefixes: str) -> None:
        for name, p in self.named_parameters():
            if _in_components(name, prefixes):
                p.requires_grad = True

    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """name -> array (the arrays themselves, on their device)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, checking names and shapes first.

        Nothing is changed unless every tensor fits, so a mismatched checkpoint
        leaves the model as it was.
        """
        params = dict(self.named_parameters())
        missing = [n for n in params if n not in state]
        unexpected = [n for n in state if n not in params]
        if strict and (missing or unexpected):
            raise ValueError(
                "state dict does not match the model: "
                f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
            )
        for name, p in params.items():
            if name in state and tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(state[name].shape)} in the state dict "
                    f"but {tuple(p.shape)} in the model"
                )
        for name, p in params.items():
            if name in state:
                arr = backend.to_device(state[name], dtype=p.dtype, device_name=backend.device_of(p.data))
                # never share memory with the caller's arrays: an in-place update of
                # this model must not change theirs
                p.data = arr.copy() if arr is state[name] or arr.base is not None else arr
                p.grad = None

    def to(self, device_name: str):
        """Move every parameter to 'cpu' or 'cuda'."""
        for p in self.parameters():
            p.data = backend.to_device(p.data, device_name=device_name)
            p.grad = None
        return self

    def astype(self, dtype):
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self


def _in_components(name: str, prefixes) -> bool:
    """Whether a parameter name lies in one of the named components (all if none are named)."""
    if not prefixes:
        return True
    return any(name == c or name.startswith(c + ".") for c in (p.rstrip(".") for p in prefixes))
