"""Optimisers (SGD, AdamW), gradient clipping and the warmup + cosine schedule.

    opt = AdamW(param_groups(model, weight_decay=0.1), lr=6e-4)
    sched = CosineWithWarmup(peak_lr=6e-4, total_steps=10_000, warmup_steps=200)
    for step in range(10_000):
        loss = ...; model.backward(...)        # adds into every p.grad
        norm = clip_grad_norm(model, 1.0)      # the one host sync of the step
        opt.lr = sched(step)
        opt.step()
        opt.zero_grad()

The update rules are PyTorch's (``torch.optim.SGD`` and ``torch.optim.AdamW``), so a
run can be checked against it number for number. Every update happens in place on
``p.data`` with ``out=`` and in-place operators: the moments, the parameters and one
shared scratch buffer (the size of the largest parameter) are all the memory a step
touches, and every array keeps the parameter's dtype (Python-float hyperparameters
meet arrays only through in-place ops or ``out=``, which never upcast).

Parameters can be given as a Module, a list of Parameters, a list of
``(name, Parameter)`` pairs, or a list of groups ``{"params": [...], "lr": ...,
"weight_decay": ...}`` whose entries override the optimiser's defaults. State is
saved by ``state_dict()`` as JSON-able hyperparameters plus a flat name -> array dict
(ready for safetensors), keyed by the parameter's dotted name where one was given.
"""

from __future__ import annotations

import math

from . import backend, parallel
from .nn.module import Module, Parameter

__all__ = [
    "Optimizer",
    "SGD",
    "AdamW",
    "param_groups",
    "clip_grad_norm",
    "CosineWithWarmup",
]


# -- parameter lists and groups ----------------------------------------------------------

def _named(params) -> list[tuple[str | None, Parameter]]:
    """A Module, Parameters or (name, Parameter) pairs -> [(name or None, Parameter)]."""
    if isinstance(params, Module):
        return list(params.named_parameters())
    if isinstance(params, Parameter):
        raise TypeError("params must be an iterable of Parameters, not a single Parameter")
    out = []
    for item in params:
        if isinstance(item, Parameter):
            out.append((None, item))
        elif (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], Parameter)
        ):
            out.append((item[0], item[1]))
        else:
            raise TypeError(
                f"expected a Parameter or a (name, Parameter) pair, got {type(item).__name__}"
            )
    return out


def _matches(name: str, pattern: str) -> bool:
    """Does one dotted component of ``name`` equal ``pattern`` or start with ``pattern_``?

    So "ln" matches "h.0.ln_1.weight" and "ln_f.bias" but not "c_attn"; "bias"
    matches "h.0.attn.c_attn.bias".
    """
    return any(part == pattern or part.startswith(pattern + "_") for part in name.split("."))


def param_groups(
    model_or_named_params,
    weight_decay: float,
    no_decay=("bias", "ln", "wte", "wpe", "embed_tokens"),
    decay_embeddings: bool = False,
) -> list[dict]:
    """Two groups, ``[decayed, not decayed]``, the usual GPT-2 split for AdamW.

    A parameter is decayed iff it is a matrix (``ndim >= 2``) and no dotted component
    of its name matches a ``no_decay`` pattern (equal to it, or starting with it and
    ``_``). That leaves the matmul weights decayed and biases, LayerNorm gains and the
    token/position embeddings (``wte``, ``wpe``, Llama's ``embed_tokens``; with a tied
    output head the shared matrix is named ``wte.weight``) undecayed;
    ``decay_embeddings=True`` takes the embeddings out of the patterns. Frozen parameters
    are kept in their group (the optimiser skips them) so names stay stable when they are
    unfrozen.
    """
    patterns = tuple(no_decay)
    if decay_embeddings:
        patterns = tuple(p for p in patterns if p not in ("wte", "wpe", "embed_tokens"))
    decay, keep = [], []
    for name, p in _named(model_or_named_params):
        if name is None:
            raise TypeError("param_groups needs names: pass a Module or named_parameters()")
        if p.data.ndim >= 2 and not any(_matches(name, pat) for pat in patterns):
            decay.append((name, p))
        else:
            keep.append((name, p))
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": keep, "weight_decay": 0.0},
    ]


# -- the optimiser base ------------------------------------------------------------------

class Optimizer:
    """Groups of parameters, their per-parameter state, zero_grad and state save/load.

    ``param_groups[i]`` is a dict with ``"params"`` (Parameters), ``"names"`` (the
    stable key of each: its dotted name, or its index over all groups when no name
    was given) and the group's hyperparameters. ``state[key]`` holds ``"step"`` (the
    updates this parameter has had: PyTorch counts per parameter, which matters for
    Adam's bias correction when a parameter sometimes has no gradient) and the
    subclass's arrays (``slots``).
    """

    defaults: dict = {}
    slots: tuple = ()  # names of the per-parameter arrays, e.g. ("exp_avg", "exp_avg_sq")

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self._check_hyper(self.defaults)
        self.param_groups: list[dict] = []
        self.state: dict[str, dict] = {}
        self.step_count = 0  # calls to step()
        self._scratch: dict = {}  # (device, dtype) -> flat buffer, shared by all parameters

        if isinstance(params, Module):
            raw_groups = [{"params": params}]
        else:
            params = list(params)
            if params and all(isinstance(g, dict) for g in params):
                raw_groups = params
            elif any(isinstance(g, dict) for g in params):
                raise TypeError("params mixes group dicts with Parameters: use only one kind")
            else:
                raw_groups = [{"params": params}]

        seen_ids, index = set(), 0
        for g in raw_groups:
            if "params" not in g:
                raise ValueError("a parameter group needs a 'params' entry")
            unknown = set(g) - {"params"} - set(self.defaults)
            if unknown:
                raise ValueError(
                    f"unknown keys {sorted(unknown)} in a parameter group of {type(self).__name__}: "
                    f"expected {sorted(self.defaults)}"
                )
            group = {k: g.get(k, v) for k, v in self.defaults.items()}
            group = self._normalise_hyper(group)
            self._check_hyper(group)
            group["params"], group["names"] = [], []
            for name, p in _named(g["params"]):
                if id(p) in seen_ids:
                    raise ValueError(
                        f"parameter {name or index!r} appears more than once in the optimiser"
                    )
                seen_ids.add(id(p))
                key = name if name is not None else str(index)
                group["params"].append(p)
                group["names"].append(key)
                index += 1
            self.param_groups.append(group)
        if index == 0:
            raise ValueError("optimiser got an empty parameter list")
        keys = [k for g in self.param_groups for k in g["names"]]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"parameter names are not unique: {dup}")

    # -- hyperparameters -----------------------------------------------------------------

    @staticmethod
    def _normalise_hyper(group: dict) -> dict:
        """Plain Python floats (never NumPy scalars), so arrays keep their dtype and
        the hyperparameters dump to JSON as they are."""
        out = {}
        for k, v in group.items():
            if isinstance(v, (tuple, list)):
                out[k] = tuple(float(x) for x in v)
            else:
                out[k] = float(v)
        return out

    def _check_hyper(self, group: dict) -> None:
        for k in ("lr", "eps", "weight_decay", "momentum"):
            if k in group and not float(group[k]) >= 0.0:
                raise ValueError(f"{type(self).__name__}: {k} must be >= 0, got {group[k]}")

    @property
    def lr(self) -> float:
        """The first group's learning rate; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        value = float(value)
        if not value >= 0.0:
            raise ValueError(f"lr must be >= 0, got {value}")
        for g in self.param_groups:
            g["lr"] = value

    # -- stepping --------------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Drop every gradient (None means zero), as ``Parameter.zero_grad`` does."""
        for g in self.param_groups:
            for p in g["params"]:
                p.zero_grad()

    def _buffer(self, p):
        """A scratch array shaped like ``p``: a view into one flat buffer per device and
        dtype, sized for the largest parameter, so a step allocates nothing."""
        xp = backend.array_module(p.data)
        key = (backend.device_of(p.data), p.data.dtype.str)
        flat = self._scratch.get(key)
        if flat is None or flat.size < p.data.size:
            # size for every parameter on this device and dtype at once
            need = max(
                q.data.size
                for g in self.param_groups
                for q in g["params"]
                if backend.device_of(q.data) == key[0] and q.data.dtype.str == key[1]
            )
            flat = xp.empty(max(need, p.data.size), dtype=p.data.dtype)
            self._scratch[key] = flat
        return flat[: p.data.size].reshape(p.data.shape)

    def step(self) -> None:
        """One update of every parameter that requires a gradient and has one."""
        self.step_count += 1
        for group in self.param_groups:
            for key, p in zip(group["names"], group["params"]):
                if not p.requires_grad or p.grad is None:
                    continue
                if p.grad.shape != p.data.shape:
                    raise ValueError(
                        f"gradient of {key!r} has shape {tuple(p.grad.shape)}, "
                        f"parameter has {tuple(p.data.shape)}"
                    )
                state = self.state.setdefault(key, {"step": 0})
                state["step"] += 1
                self._update(group, p, state, self._buffer(p))

    def _update(self, group, p, state, buf) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _required_slots(self, group: dict) -> tuple:
        """The arrays a parameter that has been stepped must have (for load checks)."""
        return self.slots

    # -- saving and restoring --------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"hyper": JSON-able dict, "tensors": {f"{key}.{slot}": array}}``.

        The arrays are the live state (no copy, as with ``Module.state_dict``): write
        or copy them before the next ``step()``.
        """
        groups = []
        for g in self.param_groups:
            entry = {}
            for k in self.defaults:
                v = g[k]
                entry[k] = [float(x) for x in v] if isinstance(v, tuple) else v
            entry["params"] = list(g["names"])
            groups.append(entry)
        tensors = {}
        for key, st in self.state.items():
            for slot in self.slots:
                if st.get(slot) is not None:
                    tensors[f"{key}.{slot}"] = st[slot]
        hyper = {
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "groups": groups,
            "param_steps": {key: int(st["step"]) for key, st in self.state.items()},
        }
        return {"hyper": hyper, "tensors": tensors}

    def _check_groups(self, hyper: dict):
        """(every parameter by name, each group's saved hyperparameters), after checking that
        the state dict is this optimiser's, with the same groups of the same parameters."""
        name = type(self).__name__
        if hyper.get("optimizer") != name:
            raise ValueError(f"state dict is for {hyper.get('optimizer')!r}, not {name!r}")
        if len(hyper["groups"]) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(hyper['groups'])} parameter groups, "
                f"the optimiser {len(self.param_groups)}"
            )
        params = {}
        for i, (saved, g) in enumerate(zip(hyper["groups"], self.param_groups)):
            if list(saved["params"]) != g["names"]:
                raise ValueError(
                    f"parameter group {i} holds {saved['params']} in the state dict "
                    f"but {g['names']} in the optimiser"
                )
            params.update(zip(g["names"], g["params"]))
        new_groups = []
        for saved in hyper["groups"]:
            hp = self._normalise_hyper({k: saved[k] for k in self.defaults if k in saved})
            self._check_hyper(hp)
            new_groups.append(hp)
        return params, new_groups

    def _check_tensors(self, hyper: dict, tensors: dict, params: dict, new_groups: list) -> dict:
        """Every state tensor names a parameter and a slot and has its shape, and every
        parameter that has taken steps has its slots; returns the per-parameter step counts."""
        for tname, arr in tensors.items():
            key, _, slot = tname.rpartition(".")
            if key not in params or slot not in self.slots:
                raise ValueError(f"unexpected tensor {tname!r} in the optimiser state dict")
            if tuple(arr.shape) != tuple(params[key].data.shape):
                raise ValueError(
                    f"tensor {tname!r} has shape {tuple(arr.shape)} in the state dict "
                    f"but the parameter has {tuple(params[key].data.shape)}"
                )
        steps = hyper.get("param_steps", {})
        for key, n in steps.items():
            if key not in params:
                raise ValueError(f"state dict has a step count for unknown parameter {key!r}")
        for hp, g in zip(new_groups, self.param_groups):
            merged = {**{k: g[k] for k in self.defaults}, **hp}
            for key in g["names"]:
                if steps.get(key, 0) > 0:
                    for slot in self._required_slots(merged):
                        if f"{key}.{slot}" not in tensors:
                            raise ValueError(f"tensor {key}.{slot!s} is missing from the state dict")
        return steps

    def load_state_dict(self, sd: dict) -> None:
        """Restore from ``state_dict()``'s output (arrays may be NumPy or CuPy).

        Everything is checked before anything changes: the optimiser type, the groups
        and their parameter names, every tensor's name and shape (a ValueError names
        the tensor). Arrays are copied onto each parameter's device in its dtype.
        """
        hyper, tensors = sd["hyper"], sd["tensors"]
        params, new_groups = self._check_groups(hyper)
        steps = self._check_tensors(hyper, tensors, params, new_groups)

        # all checks passed: now change things
        for hp, g in zip(new_groups, self.param_groups):
            g.update(hp)
        self.step_count = int(hyper.get("step", 0))
        self.state = {key: {"step": int(n)} for key, n in steps.items()}
        for tname, arr in tensors.items():
            key, _, slot = tname.rpartition(".")
            p = params[key]
            new = backend.to_device(arr, dtype=p.data.dtype, device_name=backend.device_of(p.data))
            # never share memory with the caller's arrays: steps update state in place
            if new is arr or new.base is not None or not new.flags.c_contiguous:
                new = backend.array_module(new).array(new, copy=True, order="C")
            self.state.setdefault(key, {"step": 0})[slot] = new


# -- SGD --------------------------------------------------------------------------------------

class SGD(Optimizer):
    """Stochastic gradient descent with momentum and (coupled, L2) weight decay.

    PyTorch's rule, dampening 0, no Nesterov::

        d = g + wd * p
        buf = d                     (first step)
        buf = momentum * buf + d    (later steps; when momentum > 0)
        p -= lr * buf               (or lr * d without momentum)
    """

    slots = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _required_slots(self, group: dict) -> tuple:
        return self.slots if group["momentum"] != 0.0 else ()

    def _update(self, group, p, state, buf) -> None:
        xp = backend.array_module(p.data)
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = p.grad
        if wd != 0.0:
            # d = g + wd * p, in the scratch buffer: the gradient itself stays untouched
            xp.multiply(p.data, wd, out=buf)
            buf += d
            d = buf
        if mom != 0.0:
            m = state.get("momentum_buffer")
            if m is None:
                m = state["momentum_buffer"] = d.astype(p.data.dtype, copy=True)
            else:
                m *= mom
                m += d
            d = m
        # p -= lr * d; buf may hold d itself, which multiply reads before writing
        xp.multiply(d, lr, out=buf)
        p.data -= buf


# -- AdamW ------------------------------------------------------------------------------------

class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's rule::

        t += 1
        p -= lr * wd * p                                   (decoupled decay, first)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    The last line is computed as ``p -= a * m / (sqrt(v) + eps * sqrt(1 - b2^t))`` with
    ``a = lr * sqrt(1 - b2^t) / (1 - b1^t)``, the same number with one pass less over
    the parameter.

    Every ``FLUSH_EVERY`` steps of a parameter, moments smaller than
    ``finfo.tiny / finfo.eps`` (~1e-31 in float32) are set to 0. A row whose gradient
    stops (an untied embedding's rare token) has m shrink by b1 = 0.9 a step, and after
    ~750 steps m is subnormal, where every multiply takes a slow microcode path: measured,
    one AdamW step of a (50257, 768) embedding took 80 ms with normal moments and 335 ms
    with m subnormal on 96% of its rows (benchmarks/bench_adamw_subnormal.py). Between two flushes m shrinks by 0.9^50 ~ 5e-3,
    so it never gets from the threshold down to subnormal. What is dropped is below
    1e-31 against an eps of 1e-8 in the denominator: a change of the update far under
    float32's rounding (exact results before step FLUSH_EVERY are untouched).
    """

    FLUSH_EVERY = 50

    slots = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _check_hyper(self, group: dict) -> None:
        super()._check_hyper(group)
        if "betas" in group:
            betas = group["betas"]
            if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
                raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas}")

    def _update(self, group, p, state, buf) -> None:
        xp = backend.array_module(p.data)
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        b1, b2 = group["betas"]
        g = p.grad
        if "exp_avg" not in state:
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        t = state["step"]
        hyper = adamw_hyper(group, t)
        if backend.is_cupy_array(p.data) or p.data.size <= 2 * _CHUNK:
            _adamw_math(xp, p.data, g, m, v, buf.reshape(-1)[:p.data.size].reshape(p.data.shape), *hyper)
        else:
            self._update_in_chunks(xp, p.data, g, m, v, buf, hyper)
        if t % self.FLUSH_EVERY == 0:
            _flush_tiny(xp, m, v)

    @staticmethod
    def _update_in_chunks(xp, data, g, m, v, buf, hyper) -> None:
        # On the CPU each line of _adamw_math is a full pass over memory; done in
        # cache-sized chunks the arrays are read and written about once instead of ~11
        # times, and the chunks are shared out to numpygpt.parallel's threads (NumPy's
        # element-wise ops run on one core but release the GIL), so the update uses the
        # cores the layers do: NUMPYGPT_NUM_THREADS, the CPU affinity, a rank's share.
        # buf is as large as the parameter: each chunk's scratch is its own slice of it.
        pf, gf, mf, vf, bf = (a.reshape(-1) for a in (data, g, m, v, buf))  # views: all contiguous

        def work(start: int, stop: int) -> None:
            _adamw_math(xp, pf[start:stop], gf[start:stop], mf[start:stop], vf[start:stop], bf[start:stop], *hyper)

        parallel.for_chunks(work, pf.size, _CHUNK)


def adamw_hyper(group: dict, t: int) -> tuple:
    """The scalars of ``_adamw_math`` for a parameter of ``group`` at its step ``t``."""
    b1, b2 = group["betas"]
    return (group["lr"], group["eps"], group["weight_decay"], b1, b2, 1.0 - b1**t, math.sqrt(1.0 - b2**t))


def _flush_tiny(xp, m, v) -> None:
    """Zero the moments below finfo.tiny / finfo.eps before they decay to subnormals
    (see AdamW)."""
    info = xp.finfo(m.dtype)
    threshold = float(info.tiny) / float(info.eps)
    m[xp.abs(m) < threshold] = 0
    v[v < threshold] = 0


_CHUNK = 1 << 16  # elements per AdamW chunk on the CPU: 256 KiB of float32, fits L2


def _adamw_math(xp, p, g, m, v, buf, lr, eps, wd, b1, b2, bc1, bc2_sqrt) -> None:
    """One AdamW update of arrays p, m, v (in place) from g, using buf as scratch."""
    if lr * wd != 0.0:
        p *= 1.0 - lr * wd
    # m = b1 * m + (1 - b1) * g
    m *= b1
    xp.multiply(g, 1.0 - b1, out=buf)
    m += buf
    # v = b2 * v + (1 - b2) * g^2
    v *= b2
    xp.multiply(g, g, out=buf)
    buf *= 1.0 - b2
    v += buf
    # p -= a * m / (sqrt(v) + eps * sqrt(1 - b2^t))
    xp.sqrt(v, out=buf)
    buf += eps * bc2_sqrt
    xp.divide(m, buf, out=buf)
    buf *= lr * bc2_sqrt / bc1
    p -= buf


# -- gradient clipping ---------------------------------------------------------------------

def clip_grad_norm(params, max_norm: float, sync: bool = True):
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    ``norm = sqrt(sum over params of sum(g^2))`` over the gradients that exist; when
    ``coef = max_norm / (norm + 1e-6)`` is below 1 every gradient is multiplied by it
    in place (PyTorch's ``clip_grad_norm_``). Returns the norm before clipping as a
    Python float: the one host sync (the per-tensor sums stay on the device until
    then). A non-finite norm is returned and the gradients are left as they are.
    ``params``: a Module, Parameters, (name, Parameter) pairs or an Optimizer; an optimiser
    that holds the gradients itself (``zero.ShardedAdamW``: each rank has a shard of the
    summed gradient) clips them with its own ``clip_grad_norm``.

    ``sync=False``: on the GPU, no host sync at all: the norm comes back as a 0-d float64
    array on the device and the coefficient is applied there (every gradient is
    multiplied, by 1 when nothing is clipped), so a training step can fetch the norm
    together with its loss in one transfer (``backend.host_floats``). On the CPU the
    result is the same float as with ``sync=True``.
    """
    if hasattr(params, "clip_grad_norm"):
        return params.clip_grad_norm(max_norm, sync)
    if isinstance(params, Optimizer):
        plist = [p for g in params.param_groups for p in g["params"]]
    else:
        plist = [p for _, p in _named(params)]
    grads = [p.grad for p in plist if p.grad is not None]
    if not grads:
        return 0.0
    total = None
    for g in grads:
        xp = backend.array_module(g)
        sq = xp.vdot(g.ravel(), g.ravel())  # 0-d; on CuPy it stays on the device
        total = sq if total is None else total + sq
    return clip_by_total(grads, total, max_norm, sync)


def clip_by_total(grads, total, max_norm: float, sync: bool = True):
    """clip_grad_norm's rule once the squares are summed: ``total`` = sum of every g^2 (a 0-d
    array; summed over the ranks by a sharded optimiser)."""
    if not sync and backend.is_cupy_array(total):
        return _clip_on_device(backend.array_module(total), grads, total, float(max_norm))
    norm = float(total) ** 0.5
    coef = float(max_norm) / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return norm


def _clip_on_device(xp, grads, total, max_norm: float):
    """clip_grad_norm's rule with the norm kept on the device; returns it (0-d float64)."""
    norm = xp.sqrt(total.astype(xp.float64))
    coef = max_norm / (norm + 1e-6)
    coef = xp.where(xp.isfinite(norm) & (coef < 1.0), coef, 1.0)  # 1: leave the gradients alone
    for g in grads:
        g *= coef.astype(g.dtype)  # in the gradient's dtype, as the host rule's Python float
    return norm


# -- learning-rate schedule -----------------------------------------------------------------

class CosineWithWarmup:
    """Linear warmup, then cosine decay (Raschka, *Build a LLM from Scratch*, appendix D)::

        step < warmup_steps:  lr = initial_lr + step * (peak_lr - initial_lr) / warmup_steps
        otherwise:            progress = (step - warmup_steps) / (total_steps - warmup_steps)
                              lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + cos(pi * progress))

    so ``lr(0) = initial_lr``, ``lr(warmup_steps) = peak_lr``, ``lr(total_steps) = min_lr``
    and ``min_lr`` after that.
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0, initial_lr: float = 0.0):
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
                f"total_steps={total_steps}"
            )
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.initial_lr = float(initial_lr)

    def lr_at(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.initial_lr + step * (self.peak_lr - self.initial_lr) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr_at(step)

    def __repr__(self) -> str:
        return (
            f"CosineWithWarmup(peak_lr={self.peak_lr}, total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, min_lr={self.min_lr}, initial_lr={self.initial_lr})"
        )
