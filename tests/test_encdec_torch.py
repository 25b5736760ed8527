"""The encoder-decoder against torch.nn.Transformer on the same weights, in float64:
logits and every parameter's gradient, with padded sources (src_key_padding_mask and
memory_key_padding_mask), pre- and post-LayerNorm. torch (a test dependency) supplies the
blocks; the embeddings, positions and head around them are written out in torch here."""

import math

import numpy as np
import pytest

from numpygpt import backend
from numpygpt.encdec import EncDecConfig, EncoderDecoder
from numpygpt.nn.positional import sinusoidal_table

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor")
F = torch.nn.functional
V, PAD, C = 13, 0, 8


def torch_transformer(cfg: EncDecConfig):
    tr = torch.nn.Transformer(d_model=cfg.emb_dim, nhead=cfg.n_heads, num_encoder_layers=cfg.n_enc_layers,
                              num_decoder_layers=cfg.n_dec_layers, dim_feedforward=4 * cfg.emb_dim, dropout=0.0,
                              activation=lambda x: F.gelu(x, approximate="tanh"), batch_first=True,
                              norm_first=cfg.norm_first, dtype=torch.float64)
    if not cfg.norm_first:  # the paper's post-LN stacks end in a block's norm; torch adds one more
        tr.encoder.norm = tr.decoder.norm = None
    return tr


def weight_table(model: EncoderDecoder, tr):
    """[(our name, torch tensor, its view as our array)]: Linear weights are stored (in, out),
    torch's (out, in); torch's fused in_proj of the cross-attention is our c_q and c_kv."""
    rows = []

    def linear(ours, theirs, lo=None, hi=None):
        w, b = getattr(theirs, "in_proj_weight", None), getattr(theirs, "in_proj_bias", None)
        if w is None:
            w, b = theirs.weight, theirs.bias
        rows.append((ours + ".weight", w, lambda t: t[lo:hi].T))
        rows.append((ours + ".bias", b, lambda t: t[lo:hi]))

    def norm(ours, theirs):
        rows.append((ours + ".weight", theirs.weight, lambda t: t))
        rows.append((ours + ".bias", theirs.bias, lambda t: t))

    for stack, layers in (("encoder", tr.encoder.layers), ("decoder", tr.decoder.layers)):
        for i, layer in enumerate(layers):
            p = f"{stack}.{i}."
            linear(p + "attn.c_attn", layer.self_attn)
            linear(p + "attn.c_proj", layer.self_attn.out_proj)
            linear(p + "mlp.c_fc", layer.linear1)
            linear(p + "mlp.c_proj", layer.linear2)
            for j in (1, 2, 3) if stack == "decoder" else (1, 2):
                norm(p + f"ln_{j}", getattr(layer, f"norm{j}"))
            if stack == "decoder":
                linear(p + "cross_attn.c_q", layer.multihead_attn, None, C)
                linear(p + "cross_attn.c_kv", layer.multihead_attn, C, None)
                linear(p + "cross_attn.c_proj", layer.multihead_attn.out_proj)
    if model.ln_enc is not None:
        norm("ln_enc", tr.encoder.norm)
        norm("ln_dec", tr.decoder.norm)
    return rows


def reference(model, tr, src, tgt):
    """torch's logits for (src, tgt), with the embeddings and head as leaf tensors."""
    params = dict(model.named_parameters())
    leaves = {name: torch.tensor(backend.to_host(params[name].data), requires_grad=True)
              for name in ("src_emb.weight", "tgt_emb.weight", "lm_head.weight") if name in params}
    src_table = leaves["src_emb.weight"]
    tgt_table = leaves.get("tgt_emb.weight", src_table)
    head = leaves.get("lm_head.weight", tgt_table)
    pe = torch.tensor(backend.to_host(sinusoidal_table(16, C)))
    S, T = src.shape[1], tgt.shape[1]
    src_t, tgt_t = torch.tensor(src), torch.tensor(tgt)
    x_src = src_table[src_t] * math.sqrt(C) + pe[:S]
    x_tgt = tgt_table[tgt_t] * math.sqrt(C) + pe[:T]
    pad = src_t == PAD
    out = tr(x_src, x_tgt, tgt_mask=tr.generate_square_subsequent_mask(T, dtype=torch.float64),
             src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
    return out @ head.T, leaves


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("share,tie", [(True, True), (False, False)])
def test_logits_and_gradients_equal_torch(device, norm_first, share, tie):
    torch.manual_seed(0)
    cfg = EncDecConfig(vocab_size=V, context_length=16, emb_dim=C, n_heads=2, n_enc_layers=2, n_dec_layers=3,
                       drop_rate=0.0, norm_first=norm_first, share_embeddings=share, tie_weights=tie,
                       pad_id=PAD, dtype="float64")
    model = EncoderDecoder(cfg, seed=1)
    tr = torch_transformer(cfg)
    rng = np.random.default_rng(3)
    params = dict(model.named_parameters())
    table = weight_table(model, tr)
    with torch.no_grad():  # torch's weights, perturbed so that no LayerNorm is the identity
        for tensor in tr.parameters():
            tensor.add_(torch.tensor(rng.standard_normal(tuple(tensor.shape)) * 0.1))
    for name, tensor, view in table:
        params[name].data = backend.to_device(view(tensor.detach()).numpy().copy(), dtype="float64")
    covered = {name for name, _, _ in table} | {"src_emb.weight", "tgt_emb.weight", "lm_head.weight"}
    assert set(params) <= covered

    src = np.array([[3, 4, 5, 6, 7, 8, 9], [5, 6, 7, PAD, PAD, PAD, PAD], [9, 10, 11, 12, 2, PAD, PAD]])
    tgt = np.array([[1, 3, 4, 5, 6], [1, 7, 8, 2, PAD], [1, 12, 11, 10, 9]])
    logits = model(src, tgt)
    ref, leaves = reference(model, tr, src, tgt)
    np.testing.assert_allclose(backend.to_host(logits), ref.detach().numpy(), rtol=1e-10, atol=1e-12)

    dlogits = rng.standard_normal(ref.shape)
    model.backward(backend.to_device(dlogits, dtype="float64"))
    (ref * torch.tensor(dlogits)).sum().backward()
    for name, tensor, view in table:
        np.testing.assert_allclose(backend.to_host(params[name].grad), view(tensor.grad).numpy(),
                                   rtol=1e-9, atol=1e-11, err_msg=name)
    for name, leaf in leaves.items():
        np.testing.assert_allclose(backend.to_host(params[name].grad), leaf.grad.numpy(), rtol=1e-9,
                                   atol=1e-11, err_msg=name)
