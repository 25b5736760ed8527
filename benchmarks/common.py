"""Shared pieces of the benchmarks: thread control, machine description, configs,
FLOP counts, timing and Markdown tables.

Import this module before NumPy: ``early_threads()`` must set the BLAS thread
environment variables before NumPy (and its OpenBLAS) loads, so nothing here imports
NumPy or torch at module level.

    import common                      # benchmarks/ is sys.path[0] when run as a script
    common.early_threads()             # reads --threads N from sys.argv
    import numpy as np                 # now OpenBLAS starts with N threads
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)

# the benchmarks run from a checkout: prefer its numpygpt over an installed copy
if REPO_ROOT not in sys.path:
    sys.path.insert(1, REPO_ROOT)

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


# -- threads ------------------------------------------------------------------------------

def default_threads() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def early_threads(argv=None) -> int:
    """Read ``--threads N`` from argv (default: every core) and export it to the BLAS and
    OpenMP environment variables, so NumPy's BLAS and torch start with N threads.

    Must run before NumPy is imported; ``apply_threads`` enforces the same count again at
    run time (threadpoolctl, torch.set_num_threads) in case something imported it first.
    """
    argv = sys.argv[1:] if argv is None else argv
    # set on some machines: they make a current OpenBLAS use older, slower kernels
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        os.environ.pop(var, None)
    n = default_threads()
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    return n


def apply_threads(n: int, torch_too: bool = True) -> dict:
    """Limit NumPy's BLAS (threadpoolctl, when installed), numpygpt's own thread pool
    (numpygpt.parallel) and torch to ``n`` threads.

    It also sets up the process's memory allocator as numpygpt's training does
    (``numpygpt.memory.keep_freed_memory``: glibc keeps freed memory instead of returning
    it to the kernel). That is process-wide, so PyTorch, run in the same process, gets it
    too; ``NUMPYGPT_KEEP_FREED_MEMORY=0`` in the environment measures both without it."""
    from numpygpt import memory, parallel

    parallel.set_num_threads(n)
    info = {"threads": n, "keep_freed_memory": memory.keep_freed_memory()}
    try:
        import threadpoolctl

        # keep the controller alive: limits hold only while it is referenced
        global _LIMITER
        _LIMITER = threadpoolctl.threadpool_limits(limits=n)
        info["threadpoolctl"] = threadpoolctl.__version__
    except ImportError:
        info["threadpoolctl"] = None
    if torch_too and _torch_importable():
        import torch

        torch.set_num_threads(n)
        info["torch_threads"] = torch.get_num_threads()
    return info


_LIMITER = None


def _torch_importable() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except ValueError:  # pragma: no cover
        return False


def torch_available() -> bool:
    return _torch_importable()


# -- machine description --------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The SIMD extensions that matter for float32 GEMM."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    keep = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
                    return " ".join(k for k in keep if k in flags)
    except OSError:
        pass
    return ""


def total_memory_gib() -> float:
    return meminfo_gib("MemTotal")


def meminfo_gib(field: str) -> float:
    """A /proc/meminfo field (MemTotal, MemAvailable, ...) in GiB; NaN where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def malloc_description() -> str:
    """How this process's malloc treats freed memory (numpygpt.memory)."""
    from numpygpt import memory

    if memory.freed_memory_kept():
        return "glibc keeps freed memory (numpygpt.memory.keep_freed_memory, for every implementation)"
    return "default (freed large arrays go back to the kernel)"


def numpy_blas() -> str:
    """Which BLAS NumPy calls and with how many threads (threadpoolctl when installed,
    else NumPy's build configuration)."""
    import numpy as np

    try:
        import threadpoolctl

        pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            return "; ".join(
                f"{p['internal_api']} {p.get('version')} ({p.get('architecture')} kernels, "
                f"{p.get('threading_layer')}, {p['num_threads']} threads)"
                for p in pools
            )
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version')}"
    except Exception:  # pragma: no cover - old NumPy
        return "unknown"


def torch_description() -> str:
    if not torch_available():
        return "not installed"
    import torch

    cfg = torch.__config__.show()
    blas = "MKL" if "USE_MKL=ON" in cfg or "MKL" in cfg.split("BLAS_INFO=")[-1][:8] else ""
    for part in cfg.replace(",", "\n").splitlines():
        if "BLAS_INFO=" in part:
            blas = part.split("=", 1)[1].strip()
    par = torch.__config__.parallel_info().splitlines()
    backend = next((p.split(":", 1)[1].strip() for p in par if p.startswith("ATen parallel backend")), "?")
    return f"{torch.__version__} (BLAS {blas or '?'}, {backend}, {torch.get_num_threads()} threads)"


def machine_info() -> dict:
    import numpy as np

    return {
        "cpu": cpu_model(),
        "cores": default_threads(),
        "simd": cpu_flags(),
        "memory_gib": round(total_memory_gib(), 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": numpy_blas(),
        "torch": torch_description(),
        "os": f"{platform.system()} {platform.release()}",
    }


def machine_markdown(info: dict | None = None) -> str:
    info = info or machine_info()
    return "\n".join(f"- **{k}**: {v}" for k, v in info.items())


# -- model configurations --------------------------------------------------------------------

# The book's GPT-2 small (124M, untied: 163M parameters) at context 256, and a small model
# that runs in well under a second a step on a laptop.
CONFIGS = {
    "gpt2-small": dict(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12),
    "small": dict(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_layers=4),
    "tiny": dict(vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=2),
    # Hugging Face's GPT-2 small layout (124M): tied head, Q/K/V bias, GPT-2's own context
    "gpt2-hf": dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
                    qkv_bias=True, tie_weights=True),
}


def make_config(name: str, context: int | None = None, **overrides):
    """A numpygpt GPTConfig: a preset from CONFIGS, dropout 0, the book's qkv_bias=False and
    untied head unless the preset says otherwise."""
    from numpygpt import GPTConfig

    d = dict(dict(drop_rate=0.0, qkv_bias=False, tie_weights=False), **CONFIGS[name])
    if context is not None:
        d["context_length"] = context
    d.update(overrides)
    return GPTConfig(**d)


def flop_params(cfg) -> int:
    """Parameters that take part in matmuls: all but the lookup tables wte and wpe (a tied
    head is counted, once, since it is a (C, V) matmul)."""
    from numpygpt import count_parameters

    n = count_parameters(cfg)
    n -= cfg.context_length * cfg.emb_dim  # wpe
    if not cfg.tie_weights:
        n -= cfg.vocab_size * cfg.emb_dim  # wte: a lookup; the untied lm_head stays
    return n


def train_flops(cfg, B: int, T: int) -> float:
    """Model FLOPs of one training step (forward + backward), as in PaLM / nanoGPT:

        6 * N * B * T  +  12 * L * C * T * B * T

    N = flop_params (2 FLOPs per multiply-add, x3 for forward + backward), and the
    attention term counts q k^T and att v (2 * 2 * T * C per token per layer forward,
    x3 for backward) without discounting the causal mask's zeros.
    """
    N = flop_params(cfg)
    return 6.0 * N * B * T + 12.0 * cfg.n_layers * cfg.emb_dim * T * B * T


def forward_flops(cfg, B: int, T: int) -> float:
    return train_flops(cfg, B, T) / 3.0


# -- data and timing -----------------------------------------------------------------------

def random_batch(cfg, B: int, T: int, seed: int = 0):
    """Token ids and next-token targets, (B, T) int64 each, from a seeded generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(B, T + 1), dtype=np.int64)
    return ids[:, :-1].copy(), ids[:, 1:].copy()


def time_calls(fn, warmup: int, repeat: int) -> list[float]:
    """Call fn() warmup times untimed, then repeat times timed; seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class LoadMonitor:
    """How busy the machine was with *other* work while we ran: the CPU time /proc/stat
    counts as busy (all processes, plus hypervisor steal) minus this process's own CPU
    time, as a fraction of every core over the wall time. Other sessions share these cores
    without showing up in ``ps``; a step measured under load > ~10% is suspect.

        mon = LoadMonitor(); mon.start(); ...; other = mon.stop()   # 0.0 .. 1.0
    """

    def __init__(self):
        self.ncpu = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy_jiffies():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal guest guest_nice
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]

    def start(self):
        self._b0, self._own0, self._t0 = self._busy_jiffies(), self._own(), time.perf_counter()
        return self

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> float:
        b1 = self._busy_jiffies()
        if b1 is None or self._b0 is None:
            return float("nan")
        wall = time.perf_counter() - self._t0
        busy = (b1 - self._b0) / self.hz
        own = self._own() - self._own0
        return max(0.0, busy - own) / (wall * self.ncpu) if wall > 0 else float("nan")


def machine_load(seconds: float = 1.0) -> float:
    """Fraction of the machine busy with other work over the next ``seconds``."""
    mon = LoadMonitor().start()
    time.sleep(seconds)
    return mon.stop()


def wait_for_quiet(max_load: float = 0.1, timeout: float = 120.0, verbose: bool = True) -> float:
    """Wait (up to timeout seconds) until other work takes under max_load of the machine;
    returns the last load seen."""
    t_end = time.perf_counter() + timeout
    load = machine_load(1.0)
    while load > max_load and time.perf_counter() < t_end:
        if verbose:
            print(f"  machine busy with other work ({load:.0%}); waiting...", file=sys.stderr)
        load = machine_load(2.0)
    return load


class BusyLoops:
    """``with BusyLoops(n):`` keeps n other processes spinning on the CPU (each takes a
    core), to measure how a step holds up when another program takes a core."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        import subprocess

        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []


def median(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> float:
    """(max - min) / median: how noisy a set of timings is."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m else float("nan")


# -- output -----------------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are printed as they come (format them before)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def fmt_si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class _DefaultMalloc(argparse.Action):
    """``--default-malloc``: set NUMPYGPT_KEEP_FREED_MEMORY=0 as soon as it is parsed, so
    ``apply_threads`` (and every worker process started from here) leaves glibc's malloc
    as it is."""

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ["NUMPYGPT_KEEP_FREED_MEMORY"] = "0"
        setattr(namespace, self.dest, True)


def add_common_args(p, config_default: str = "gpt2-small"):
    p.add_argument("--config", default=config_default, choices=sorted(CONFIGS),
                   help="model size (see common.CONFIGS)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="threads for NumPy's BLAS and torch (default: every core)")
    p.add_argument("--no-torch", action="store_true", help="numpygpt only")
    p.add_argument("--default-malloc", action=_DefaultMalloc, nargs=0, default=False,
                   help="leave glibc's malloc returning freed memory to the kernel, as before "
                        "numpygpt.memory.keep_freed_memory (for every implementation)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON (run_all.py builds its speed table from them)")
    return p


def save_json(path: str | None, kind: str, results, **extra) -> None:
    """Write ``{"kind", "results", "malloc_kept", "threads", ...extra}`` to path (when given):
    the machine-readable twin of a script's Markdown table."""
    if not path:
        return
    import json

    from numpygpt import memory

    record = {"kind": kind, "malloc_kept": memory.freed_memory_kept(), "results": results, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=float)
