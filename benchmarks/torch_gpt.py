"""numpygpt's GPT-2 written again in PyTorch (eager mode), for speed and correctness
comparisons.

The same network as ``numpygpt.model``: pre-LayerNorm blocks, one fused (C, 3C) Q/K/V
projection ``c_attn`` (optional bias), tanh-approximate GELU, causal mask, dropout,
untied or tied output head, GPT-2's initialisation. Parameter names and layouts are
numpygpt's (and GPT-2's checkpoint's): Linear weights are (in, out) and the forward is
``x @ W + b`` (one ``addmm``, what ``nn.Linear`` runs), so ``load_numpygpt_weights``
copies tensors one to one with no transposes.

Attention comes in two flavours:
- ``"eager"``: q k^T, masked_fill, softmax, att v with plain tensor ops, the way the
  book (and a reader of it) writes it;
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, PyTorch's fused
  kernel (flash / memory-efficient attention where available).

    tm = TorchGPT(cfg)                        # cfg: a numpygpt GPTConfig
    load_numpygpt_weights(tm, np_model)       # same numbers as the numpygpt model
    logits = tm(idx)                          # (B, T, V)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


class Linear(nn.Module):
    """y = x @ W + b with W stored (in, out), as in numpygpt and GPT-2's checkpoints."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=dtype)) if bias else None

    def forward(self, x):
        *lead, C_in = x.shape
        x2 = x.reshape(-1, C_in)  # (N, in)
        if self.bias is None:
            y = x2 @ self.weight
        else:
            y = torch.addmm(self.bias, x2, self.weight)  # (N, out), bias fused into the GEMM
        return y.view(*lead, -1)


class KVCache:
    """Keys and values seen so far for one layer: (B, NH, T_max, hs), filled to ``length``."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def append(self, k, v, max_length: int):
        B, NH, T, hs = k.shape
        if self.k is None:
            self.k = k.new_empty(B, NH, max_length, hs)
            self.v = v.new_empty(B, NH, max_length, hs)
        end = self.length + T
        if end > max_length:
            raise ValueError(f"KV cache holds {max_length} positions; {end} were asked for")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, C: int, NH: int, context_length: int, drop: float, qkv_bias: bool,
                 attn_impl: str = "eager", dtype=torch.float32):
        super().__init__()
        if attn_impl not in ("eager", "sdpa"):
            raise ValueError(f"attn_impl must be 'eager' or 'sdpa', got {attn_impl!r}")
        self.NH, self.hs = NH, C // NH
        self.attn_impl = attn_impl
        self.context_length = context_length
        self.drop = drop
        self.c_attn = Linear(C, 3 * C, bias=qkv_bias, dtype=dtype)
        self.attn_dropout = nn.Dropout(drop)
        self.c_proj = Linear(C, C, bias=True, dtype=dtype)
        # True above the diagonal: key j is in query i's future
        self.register_buffer("future", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, x, kv_cache: KVCache | None = None):
        B, T, C = x.shape
        NH, hs = self.NH, self.hs
        qkv = self.c_attn(x).view(B, T, 3, NH, hs).permute(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
        q, k, v = qkv.unbind(0)  # (B, NH, T, hs) each
        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.append(k, v, self.context_length)  # (B, NH, T_k, hs)
        T_k = k.size(2)
        future = self.future[start:start + T, :T_k]  # (T, T_k)
        if self.attn_impl == "sdpa":
            mask = None if T == 1 else ~future  # SDPA's bool mask: True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.drop if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, NH, T, T_k)
            att = att.masked_fill(future, float("-inf"))
            att = torch.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, NH, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class FeedForward(nn.Module):
    def __init__(self, C: int, dtype=torch.float32):
        super().__init__()
        self.c_fc = Linear(C, 4 * C, dtype=dtype)
        self.c_proj = Linear(4 * C, C, dtype=dtype)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg, attn_impl: str, dtype):
        super().__init__()
        C = cfg.emb_dim
        self.ln_1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps, dtype=dtype)
        self.attn = CausalSelfAttention(C, cfg.n_heads, cfg.context_length, cfg.drop_rate, cfg.qkv_bias,
                                        attn_impl, dtype)
        self.drop_attn = nn.Dropout(cfg.drop_rate)
        self.ln_2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = FeedForward(C, dtype)
        self.drop_mlp = nn.Dropout(cfg.drop_rate)

    def forward(self, x, kv_cache=None):
        x = x + self.drop_attn(self.attn(self.ln_1(x), kv_cache))
        x = x + self.drop_mlp(self.mlp(self.ln_2(x)))
        return x


class OutputHead(nn.Module):
    """logits = x @ W.T with W (V, C): the token embedding itself when weights are tied."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return F.linear(x, self.weight)  # (B, T, V)


class TorchGPT(nn.Module):
    """GPT-2 from a numpygpt ``GPTConfig``; ``attn_impl`` is ``"eager"`` or ``"sdpa"``."""

    def __init__(self, cfg, attn_impl: str = "eager", seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        dtype = _DTYPES[cfg.dtype]
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim, dtype=dtype)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim, dtype=dtype)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList([TransformerBlock(cfg, attn_impl, dtype) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps, dtype=dtype)
        if cfg.tie_weights:
            self.lm_head = OutputHead(self.wte.weight)
        else:
            self.lm_head = OutputHead(nn.Parameter(torch.zeros(cfg.vocab_size, cfg.emb_dim, dtype=dtype)))
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        """GPT-2's scheme, as numpygpt: N(0, 0.02), residual projections (c_proj) scaled by
        1/sqrt(2 n_layers), biases 0, LayerNorm 1 and 0. (A different random stream from
        numpygpt's; use load_numpygpt_weights for identical weights.)"""
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    def forward(self, idx, kv_caches: list | None = None):
        """idx (B, T) int64 -> logits (B, T, V); with kv_caches idx holds only new tokens."""
        B, T = idx.shape
        start = kv_caches[0].length if kv_caches else 0
        if start + T > self.cfg.context_length:
            raise ValueError(f"sequence length {start + T} exceeds context_length {self.cfg.context_length}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, kv_caches[i] if kv_caches else None)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def new_kv_caches(self) -> list:
        return [KVCache() for _ in self.h]


# -- bridging to numpygpt -------------------------------------------------------------------

@torch.no_grad()
def load_numpygpt_weights(tmodel: TorchGPT, np_model) -> None:
    """Copy every numpygpt parameter into the torch model of the same name (same layout)."""
    from numpygpt import backend

    tparams = dict(tmodel.named_parameters())
    nparams = dict(np_model.named_parameters())
    if set(tparams) != set(nparams):
        raise ValueError(f"parameter names differ: torch only {sorted(set(tparams) - set(nparams))}, "
                         f"numpygpt only {sorted(set(nparams) - set(tparams))}")
    for name, p in nparams.items():
        src = torch.from_numpy(backend.to_host(p.data))
        if tuple(src.shape) != tuple(tparams[name].shape):
            raise ValueError(f"{name}: numpygpt {tuple(src.shape)} vs torch {tuple(tparams[name].shape)}")
        tparams[name].copy_(src)


def torch_param_groups(tmodel: TorchGPT, weight_decay: float) -> list[dict]:
    """numpygpt.optim.param_groups' split (decayed matrices / the rest), for torch's AdamW.

    numpygpt's own rule decides, run on numpygpt Parameters that share the torch tensors'
    memory (``.numpy()`` makes no copy)."""
    from numpygpt import Parameter
    from numpygpt.optim import param_groups

    named = [(n, Parameter(p.detach().cpu().numpy())) for n, p in tmodel.named_parameters()]  # CUDA: a copy
    tparams = dict(tmodel.named_parameters())
    return [{"params": [tparams[name] for name, _ in g["params"]], "weight_decay": g["weight_decay"]}
            for g in param_groups(named, weight_decay)]


# -- generation ---------------------------------------------------------------------------------

@torch.inference_mode()
def generate(model: TorchGPT, idx, max_new_tokens: int, use_cache: bool = True):
    """Greedy decoding: idx (B, T0) -> (B, T0 + max_new_tokens).

    Without a cache every step runs the whole (cropped) context, as the book's
    ``generate_text_simple``; with one the prompt is run once and then one token a step.
    """
    model.eval()
    ctx = model.cfg.context_length
    if not use_cache:
        for _ in range(max_new_tokens):
            logits = model(idx[:, -ctx:])  # (B, T, V)
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
    if idx.shape[1] + max_new_tokens > ctx:
        raise ValueError("with a KV cache the prompt and new tokens must fit the context")
    caches = model.new_kv_caches()
    logits = model(idx, caches)
    out = [idx]
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits = model(nxt, caches)
    return torch.cat(out, dim=1)
