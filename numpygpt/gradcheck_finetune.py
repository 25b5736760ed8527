"""The fine-tuning layers' entries in ``numpygpt gradcheck``: the classification readout
(both modes), cross-entropy on (B, K) class logits, LoRA on a Linear (Q/K/V splits) and
on the language-model head, and a whole classifier with LoRA, all in float64."""

from __future__ import annotations

import numpy

from . import backend
from .config import GPTConfig
from .gradcheck import check_layer, check_model_loss


def finetune_gradcheck_checks(seed: int = 0) -> list:
    """[(name, thunk -> {tensor: relative error})], as cli.gradcheck_checks lists them."""
    from .lora import apply_lora
    from .model import GPTModel
    from .nn import CrossEntropyLoss, Linear, LoRALinear, LoRAOutputHead, OutputHead, Parameter, SequenceReadout

    F64 = "float64"
    rng = numpy.random.default_rng([seed, 8])
    B, T, C, K, V, PAD = 3, 5, 6, 3, 11, 10

    def randn(*shape, scale=1.0):
        return backend.to_device(rng.standard_normal(shape) * scale, dtype=F64)

    def ids():
        idx = rng.integers(0, PAD, (B, T))
        idx[0, 3:] = idx[2, 1:] = PAD  # right padding of two lengths; row 1 has none
        return backend.to_device(idx)

    def with_values(module):
        """Every weight (the zero-initialised B of LoRA included) redrawn, so no gradient is ~0."""
        for p in module.parameters():
            p.data = randn(*p.shape, scale=0.4)
        return module

    def lora_classifier():
        cfg = GPTConfig(vocab_size=V, context_length=8, emb_dim=C + 2, n_heads=2, n_layers=2, drop_rate=0.2,
                        qkv_bias=True, dtype=F64)
        model = with_values(GPTModel(cfg, seed=seed).to_classifier(K, readout="last_non_pad", pad_id=PAD, seed=seed))
        with_values(apply_lora(model, rank=2, alpha=3.0, seed=seed))
        targets = backend.to_device(rng.integers(0, K, B))
        return check_model_loss(model, CrossEntropyLoss(), ids(), targets, eps=1e-5,
                                before_forward=lambda: backend.manual_seed(seed))

    return [
        ("CrossEntropyLoss (B, K)", lambda: check_layer(
            CrossEntropyLoss(), randn(B, K, scale=2.0), backend.to_device(rng.integers(0, K, B)),
            input_names=["logits", "targets"])),
        ("SequenceReadout (last)", lambda: check_layer(SequenceReadout("last"), randn(B, T, C), max_coords=None)),
        ("SequenceReadout (non-pad)", lambda: check_layer(
            SequenceReadout("last_non_pad", pad_id=PAD), randn(B, T, C), ids(), input_names=["x", "idx"],
            max_coords=None)),
        ("LoRALinear (splits=3)", lambda: check_layer(
            with_values(LoRALinear(Linear(C, 3 * C, dtype=F64), rank=2, alpha=4.0, splits=3, seed=seed)),
            randn(B, T, C))),
        ("LoRAOutputHead", lambda: check_layer(
            with_values(LoRAOutputHead(OutputHead(Parameter(randn(V, C))), rank=2, alpha=4.0, seed=seed)),
            randn(B, T, C))),
        ("classifier + LoRA + loss", lora_classifier),
    ]
