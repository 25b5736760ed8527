"""The code several ops share, checked as such: the chunked row-norm loop (LayerNorm,
RMSNorm), the chunked element-wise loop (GELU, SiLU), and Llama's block and decoder stack
whole, in float64 against centred differences."""

import numpy as np
import pytest

from numpygpt import LlamaConfig, parallel
from numpygpt.gradcheck import check_gradients, check_layer
from numpygpt.llama import LlamaBlock, LlamaDecoder, Qwen3Block
from numpygpt.nn import GELU, LayerNorm, RMSNorm, RoPE, SiLU
from numpygpt.nn.activation import _Elementwise
from numpygpt.nn.normalization import _RowNorm

from conftest import assert_grads_ok


class _Cube(_Elementwise):
    """y = x^3 through the shared loop: a subclass gives only its two chunk functions."""

    @staticmethod
    def _forward_chunk(xp, x, kept, y):
        xp.multiply(x, x, out=kept)
        xp.multiply(kept, x, out=y)

    @staticmethod
    def _backward_chunk(xp, x, kept, dout, dx):
        xp.multiply(dout, 3.0 * kept, out=dx)


def _many_chunks(layer, x):
    """The layer's gradient check with chunks far smaller than one array, on 2 threads."""
    old = parallel.CHUNK_BYTES
    parallel.CHUNK_BYTES = 64 * 8  # 64 float64 values a chunk: dozens of chunks here
    try:
        with parallel.num_threads(2):
            return check_layer(layer, x, max_coords=60)
    finally:
        parallel.CHUNK_BYTES = old


def test_elementwise_loop_serves_any_subclass_over_many_chunks():
    assert issubclass(GELU, _Elementwise) and issubclass(SiLU, _Elementwise)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7, 33))  # 1155 values: not a multiple of the chunk
    y = _Cube()(x)
    np.testing.assert_allclose(y, x ** 3, rtol=1e-15)
    for layer in (_Cube(), GELU(), SiLU()):
        assert_grads_ok(_many_chunks(layer, x))


@pytest.mark.parametrize("make", [lambda C: LayerNorm(C, dtype="float64"), lambda C: RMSNorm(C, dtype="float64")])
def test_row_norm_loop_over_many_chunks_sums_weight_gradients_across_chunks(make):
    rng = np.random.default_rng(1)
    C = 6
    layer = make(C)
    assert isinstance(layer, _RowNorm)
    for p in layer.parameters():
        p.data = 1.0 + 0.5 * rng.standard_normal(p.shape)
    x = rng.standard_normal((4, 9, C))  # 36 rows of 48 bytes: 10 rows a chunk, 4 chunks
    errors = _many_chunks(layer, x)
    assert "weight" in errors
    assert_grads_ok(errors)


@pytest.mark.parametrize("block_class,preset", [(LlamaBlock, "llama-tiny"), (Qwen3Block, "qwen3-tiny")])
def test_llama_block_gradients(block_class, preset):
    rng = np.random.default_rng(2)
    cfg = LlamaConfig.preset(preset, dtype="float64", attn_impl="dense")
    rope = RoPE(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions=cfg.context_length)
    block = block_class(cfg, rope)
    for p in block.parameters():
        p.data = 0.5 * rng.standard_normal(p.shape)
    assert_grads_ok(check_layer(block, rng.standard_normal((2, 6, cfg.emb_dim))))


def test_llama_decoder_stack_gradients():
    """The stack below the head: embedding, blocks, final norm; its backward reaches the
    embedding table as a scatter-add (ids repeat)."""
    rng = np.random.default_rng(3)
    cfg = LlamaConfig.preset("llama-tiny", dtype="float64", vocab_size=13, n_layers=2)
    decoder = LlamaDecoder(cfg)
    for p in decoder.parameters():
        p.data = 0.5 * rng.standard_normal(p.shape)
    idx = np.array([[1, 5, 5, 2], [7, 1, 12, 1]])
    params = dict(decoder.named_parameters())
    errors = check_gradients(lambda: decoder(idx), decoder.backward, {}, params, max_coords=20)
    assert set(errors) == set(params)
    assert_grads_ok(errors)
