"""Llama 3 and Qwen3: LlamaBlock, Qwen3Block, LlamaDecoder and LlamaModel.

    idx (B, T) -> embed_tokens[idx]                      (no position embedding: RoPE)
               -> n_layers x [x + self_attn(input_layernorm(x));
                              x + mlp(post_attention_layernorm(x))]
               -> norm -> lm_head -> logits (B, T, V)

self_attn is grouped-query attention with rotary positions (Qwen3: and RMSNorm on every
query and key head), mlp is SwiGLU, every norm is RMSNorm, and no layer has a bias.
Attribute names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``,
``model.norm.weight``, ``lm_head.weight``), so loading its checkpoints is a table whose
only change is the transpose of each linear weight (HF stores them (out, in), numpygpt
(in, out)): see ``numpygpt.hf``.

The model answers the calls the rest of numpygpt makes on GPTModel: ``forward(idx,
kv_caches)``, ``backward(dlogits)``, ``forward_hidden``/``backward_hidden`` (the fused
loss's), ``new_kv_caches()``, ``named_parameters()``,
``zero_grad``, ``train``/``eval``, ``state_dict``/``load_state_dict``, ``init_weights(seed)``.
"""

from __future__ import annotations

from . import backend, hf_layout
from .config import LlamaConfig
from .model import OutputLayer, _put_host, attach_classifier_head, check_token_ids, train_only
from .nn import (Embedding, GroupedQueryAttention, KVCache, Linear, Module, OutputHead, Parameter, RMSNorm, RoPE,
                 SequenceReadout, SwiGLU)
from .nn.lora import LORA_SUFFIXES
from .nn.module import skip_init


class LlamaBlock(Module):
    """Pre-RMSNorm block with two residual branches, no dropout, no biases:
        x = x + self_attn(input_layernorm(x))
        x = x + mlp(post_attention_layernorm(x))
    A residual x + f(x) passes dout straight through and adds f's input gradient.
    """

    qk_norm = False

    def __init__(self, cfg: LlamaConfig, rope: RoPE):
        C, dt = cfg.emb_dim, cfg.dtype
        self.input_layernorm = RMSNorm(C, cfg.rms_norm_eps, dtype=dt)
        self.self_attn = GroupedQueryAttention(C, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, rope,
                                               qk_norm_eps=cfg.rms_norm_eps if self.qk_norm else None,
                                               impl=cfg.attn_impl, dtype=dt)
        self.post_attention_layernorm = RMSNorm(C, cfg.rms_norm_eps, dtype=dt)
        self.mlp = SwiGLU(C, cfg.hidden_dim, dtype=dt)

    def forward(self, x, kv_cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), kv_cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x

    def backward(self, dout):
        # x2 = x1 + mlp(post_attention_layernorm(x1))
        dh = self.mlp.backward(dout)
        dx = dout + self.post_attention_layernorm.backward(dh)
        # x1 = x + self_attn(input_layernorm(x))
        dh = self.self_attn.backward(dx)
        dx += self.input_layernorm.backward(dh)
        return dx


class Qwen3Block(LlamaBlock):
    """The Llama block with QK-norm: every query and key head is RMS-normalised (weights
    of size head_dim, shared by the heads) before the rotary embedding."""

    qk_norm = True


class LlamaDecoder(Module):
    """The stack below the head (Hugging Face's ``LlamaModel``): token embedding, the
    blocks, the final RMSNorm. One RoPE serves every block, so its cos/sin tables are
    computed once per dtype."""

    def __init__(self, cfg: LlamaConfig):
        dt = cfg.dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.emb_dim, dtype=dt)
        self.rotary_emb = RoPE(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions=cfg.context_length)
        block = Qwen3Block if cfg.qk_norm else LlamaBlock
        self.layers = [block(cfg, self.rotary_emb) for _ in range(cfg.n_layers)]
        self.norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps, dtype=dt)

    def forward(self, idx, kv_caches: list | None = None):
        x = self.embed_tokens(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_caches[i] if kv_caches else None)
        return self.norm(x)

    def backward(self, dout) -> None:
        dx = self.norm.backward(dout)
        for layer in reversed(self.layers):
            dx = layer.backward(dx)
        # x = embed_tokens[idx]: a scatter-add into the table
        self.embed_tokens.backward(dx)


class LlamaModel(OutputLayer, Module):
    """Llama 3 or Qwen3 (``cfg.model_type``). ``logits = model(idx)``;
    ``model.backward(dlogits)`` fills every ``.grad``. The head is the token embedding
    itself when ``cfg.tie_weights`` (Llama 3.2 1B/3B, Qwen3 0.6B/1.7B), else its own (V, C)."""

    def __init__(self, cfg: LlamaConfig, seed: int | None = 0, init: bool = True):
        """``init=False`` leaves the weights at zeros (norm scales at one), for when a
        checkpoint's weights are loaded next."""
        if not isinstance(cfg, LlamaConfig):
            raise ValueError(f"LlamaModel is built from a LlamaConfig, got {type(cfg).__name__}")
        self.cfg = cfg.replace(lora_rank=None, lora_alpha=None)  # apply_lora below records them
        with skip_init():  # one seeded draw for the whole model, in init_weights
            self.model = LlamaDecoder(cfg)
        if cfg.num_classes is not None:  # a classifier's checkpoint: the head it was saved with
            self._classifier_parts(cfg)
        elif cfg.tie_weights:
            self.lm_head = OutputHead(self.model.embed_tokens.weight)
        else:
            self.lm_head = OutputHead(Parameter(backend.xp.zeros((cfg.vocab_size, cfg.emb_dim), dtype=cfg.dtype)))
        if init:
            self.init_weights(seed)
        if cfg.lora_rank is not None:
            from .lora import apply_lora

            apply_lora(self, cfg.lora_rank, cfg.lora_alpha, seed=seed)

    def init_weights(self, seed: int | None = 0) -> None:
        """Hugging Face's initialisation: every weight ~ N(0, 0.02), RMSNorm scales 1.
        Drawn on the host from one seeded generator in float32, then moved."""
        rng = backend.host_rng(seed)
        xp = backend.array_module(self.model.embed_tokens.weight.data)
        for name, p in self.named_parameters():
            if name.endswith((".lora_A", ".lora_B")):
                continue  # adapters keep their own initialisation (numpygpt.nn.lora)
            if name.endswith("norm.weight"):  # input_/post_attention_layernorm, q_/k_norm, model.norm
                p.data, p.grad = xp.ones(p.shape, dtype=p.dtype), None
            else:
                w = rng.standard_normal(p.shape, dtype="float32")
                w *= 0.02
                _put_host(p, w)

    def check_input(self, idx, start_pos: int = 0):
        return check_token_ids(idx, self.cfg.vocab_size, self.cfg.context_length, start_pos,
                               backend.device_of(self.model.embed_tokens.weight.data),
                               check_rows=self.readout.check_rows if self.is_classifier else None)

    def forward(self, idx, kv_caches: list | None = None):
        """idx (B, T) integer token ids -> logits (B, T, V). With ``kv_caches`` (one per
        block, ``new_kv_caches``) idx holds only the new tokens, at the positions after
        the cached ones."""
        if self.is_classifier:
            return self._classify(idx, kv_caches)  # (B, K)
        return self.lm_head(self.forward_hidden(idx, kv_caches))  # (B, T, V)

    def forward_hidden(self, idx, kv_caches: list | None = None):
        """idx (B, T) -> the final hidden states h (B, T, C) that the head reads
        (logits = h @ W^T, W = ``head.weight``), for a loss that applies the head itself
        (``numpygpt.nn.FusedLinearCrossEntropy``). ``backward_hidden(dh)`` continues from them."""
        if self.is_classifier:
            raise ValueError("a classifier's head reads one position per row: it has no per-position hidden states")
        start = kv_caches[0].length if kv_caches else 0
        idx = self.check_input(idx, start)  # (B, T) on the model's device
        return self.model(idx, kv_caches)  # (B, T, C), after the final RMSNorm

    def backward(self, dlogits) -> None:
        """The forward read in reverse; adds into every parameter's .grad."""
        if self.is_classifier:
            return self._classify_backward(dlogits)
        self.backward_hidden(self.lm_head.backward(dlogits))  # dh (B, T, C)

    def backward_hidden(self, dh) -> None:
        """Backward from dL/dh (B, T, C), h being ``forward_hidden``'s output: every
        parameter below the head gets its gradient (the head's own is the caller's; tied,
        it is the embedding's, which the scatter-add here adds to)."""
        self.model.backward(dh)

    def new_kv_caches(self) -> list:
        """One cache per block; each holds that block's NKV key/value heads."""
        return [KVCache(self.cfg.context_length) for _ in self.model.layers]

    def lora_targets(self) -> list:
        """(owner module, attribute, splits) of each layer ``apply_lora`` wraps, in model
        order: every block's q/k/v/o_proj and gate/up/down_proj, and an untied head."""
        targets = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            targets += [(attn, name, 1) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            targets += [(mlp, name, 1) for name in ("gate_proj", "up_proj", "down_proj")]
        return targets + self.head_lora_targets()

    # -- fine-tuning: a classifier, what trains, Hugging Face directories ---------------------------

    def to_classifier(self, num_classes: int, readout: str = "last", pad_id: int = 0,
                      seed: int | None = None) -> "LlamaModel":
        """Replace the output head by ``score = Linear(emb_dim, num_classes)`` with bias, read
        at one position per row of the final RMSNorm's output (``readout`` "last" or
        "last_non_pad", right padding with ``pad_id``), as ``GPTModel.to_classifier``; a tied
        head just goes (the embedding stays). Apply LoRA after this. Returns the model."""
        return attach_classifier_head(self, num_classes, readout, pad_id, seed)

    def set_trainable(self, which: str) -> "LlamaModel":
        """"all", "head", "last-block" or "last-two-blocks" (those blocks, the final RMSNorm
        and the head) train, everything else is frozen, as ``GPTModel.set_trainable``."""
        return train_only(self, which, self.model.norm, self.model.layers)

    def _classifier_parts(self, cfg: LlamaConfig) -> None:
        """A classifier's head and readout (zeros: the weights are loaded next)."""
        self.lm_head = None
        self.readout = SequenceReadout(cfg.readout, cfg.pad_id)
        with skip_init():
            self.score = Linear(cfg.emb_dim, cfg.num_classes, bias=True, dtype=cfg.dtype)

    def _classify(self, idx, kv_caches):
        """idx (B, T) -> class logits (B, K): the blocks, the final norm, one position a row, score."""
        if kv_caches:
            raise ValueError("a classifier reads whole sequences: it takes no KV cache")
        idx = self.check_input(idx)  # (B, T) on the model's device
        x = self.model(idx)  # (B, T, C), RMS-normalised per position
        x = self.readout(x, idx)  # (B, C)
        return self.score(x)  # (B, K)

    def _classify_backward(self, dlogits) -> None:
        dx = self.score.backward(dlogits)  # (B, C)
        dx = self.readout.backward(dx)  # (B, T, C)
        self.model.backward(dx)

    def save_pretrained(self, directory, max_shard_bytes: int | None = None) -> None:
        """Write config.json + model.safetensors in Hugging Face's Llama/Qwen3 layout."""
        from .nn.lora import is_merged, lora_layers

        if lora_layers(self) and not is_merged(self):
            raise ValueError("save_pretrained writes plain weights: call merge_lora(model) first to fold the LoRA "
                             "adapters in, or numpygpt.lora.save_merged(model, directory), which writes them folded "
                             "in and leaves the model as it is (or keep them apart with save_lora / save_checkpoint)")
        self.write_pretrained(directory, [(n, p.data) for n, p in self.named_parameters()
                                          if not n.endswith(LORA_SUFFIXES)], max_shard_bytes)

    def write_pretrained(self, directory, tensors, max_shard_bytes: int | None = None) -> None:
        """The same layout holding ``tensors``, (name, array or LazyTensor) in numpygpt's
        layout for every weight but the LoRA adapters (``numpygpt.lora.save_merged``)."""
        hf_layout.write_pretrained(self, directory, tensors, max_shard_bytes)
