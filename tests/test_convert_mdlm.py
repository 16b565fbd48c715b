"""MDLM DDiT conversion: a checkpoint in the published layout (written here as safetensors),
converted and loaded, gives the logits of a NumPy restatement of MDLM's forward pass.

The restatement follows kuleshov-group/mdlm @ c112c52, models/dit.py: `TimestepEmbedder`
150-189 (256-dim sin/cos of sigma, Linear -> SiLU -> Linear), `DIT.forward` 359-370
(c = silu(sigma_map(sigma))), `DDiTBlock.forward` 244-289 (adaLN chunks shift/scale/gate for
attention then MLP, 'b s (three h d)' q/k/v, rotary, softmax attention, gated residuals,
tanh GELU), `LayerNorm` 126-134 (float32, weight only, eps 1e-5), `DDitFinalLayer` 302-321,
`Rotary` 81-104 with flash-attn's non-interleaved rotation; diffusion.py `_process_sigma`
301-310 (sigma = 0 without time conditioning).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.distill.teachers.mdlm import load_teacher_denoiser
from didistill.nets import convert_mdlm
from didistill.nets.safetensors_io import read_checkpoint, read_safetensors, write_safetensors

V1, D, H, C, DEPTH, L = 11, 16, 2, 8, 2, 8  # V + 1 ids, width, heads, cond_dim, blocks, length


def _state_dict(seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.3 * rng.normal(size=shape)).astype(np.float32)
    sd = {
        "backbone.vocab_embed.embedding": w(V1, D),
        "backbone.sigma_map.mlp.0.weight": w(C, 256), "backbone.sigma_map.mlp.0.bias": w(C),
        "backbone.sigma_map.mlp.2.weight": w(C, C), "backbone.sigma_map.mlp.2.bias": w(C),
        "backbone.rotary_emb.inv_freq": (1.0 / 10000 ** (np.arange(0, D // H, 2) / (D // H)))
        .astype(np.float32),
        "backbone.output_layer.norm_final.weight": 1 + w(D),
        "backbone.output_layer.linear.weight": w(V1, D), "backbone.output_layer.linear.bias": w(V1),
        "backbone.output_layer.adaLN_modulation.weight": w(2 * D, C),
        "backbone.output_layer.adaLN_modulation.bias": w(2 * D),
    }  # fmt: skip
    for i in range(DEPTH):
        b = f"backbone.blocks.{i}"
        sd.update({
            f"{b}.norm1.weight": 1 + w(D), f"{b}.norm2.weight": 1 + w(D),
            f"{b}.attn_qkv.weight": w(3 * D, D), f"{b}.attn_out.weight": w(D, D),
            f"{b}.mlp.0.weight": w(4 * D, D), f"{b}.mlp.0.bias": w(4 * D),
            f"{b}.mlp.2.weight": w(D, 4 * D), f"{b}.mlp.2.bias": w(D),
            f"{b}.adaLN_modulation.weight": w(6 * D, C), f"{b}.adaLN_modulation.bias": w(6 * D),
        })  # fmt: skip
    return sd


def _ln(x, weight):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * weight


def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _linear(sd, key, x, bias=True):
    y = x @ sd[f"{key}.weight"].astype(np.float64).T
    return y + sd[f"{key}.bias"] if bias else y


def mdlm_forward(sd, tokens, sigma):
    """MDLM's DIT forward in float64: tokens [B, L], sigma [B] -> logits [B, L, V + 1]."""
    sd = {k.removeprefix("backbone."): v.astype(np.float64) for k, v in sd.items()}
    batch, length = tokens.shape
    d = D // H
    x = sd["vocab_embed.embedding"][tokens]
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    args = sigma[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], -1)  # [B, 256]
    c = _silu(_linear(sd, "sigma_map.mlp.2", _silu(_linear(sd, "sigma_map.mlp.0", emb))))
    angles = np.arange(length)[:, None] * (1.0 / 10000 ** (np.arange(0, d, 2) / d))[None]
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]  # [1, L, 1, d/2]

    def rotate(u):  # [B, L, H, d]
        u1, u2 = u[..., : d // 2], u[..., d // 2 :]
        return np.concatenate([u1 * cos - u2 * sin, u2 * cos + u1 * sin], -1)

    for i in range(DEPTH):
        b = f"blocks.{i}"
        mod = _linear(sd, f"{b}.adaLN_modulation", c)[:, None]  # [B, 1, 6D]
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = np.split(mod, 6, -1)
        h = _ln(x, sd[f"{b}.norm1.weight"]) * (1 + sc_a) + sh_a
        qkv = _linear(sd, f"{b}.attn_qkv", h, bias=False).reshape(batch, length, 3, H, d)
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
        scores = np.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        att = np.einsum("bhlm,bmhd->blhd", weights, v).reshape(batch, length, D)
        x = x + g_a * _linear(sd, f"{b}.attn_out", att, bias=False)
        h = _ln(x, sd[f"{b}.norm2.weight"]) * (1 + sc_m) + sh_m
        x = x + g_m * _linear(sd, f"{b}.mlp.2", _gelu_tanh(_linear(sd, f"{b}.mlp.0", h)))
    shift, scale = np.split(_linear(sd, "output_layer.adaLN_modulation", c)[:, None], 2, -1)
    h = _ln(x, sd["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return _linear(sd, "output_layer.linear", h)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdlm")
    sd = _state_dict()
    src = write_safetensors(str(root / "model.safetensors"), sd, {"format": "pt"})
    with open(root / "config.json", "w") as f:
        json.dump({"n_heads": H, "model_length": L, "time_conditioning": False}, f)
    dst = convert_mdlm.convert(src, str(root / "teacher_params.msgpack"))
    return sd, dst, root


def test_converted_teacher_matches_numpy_mdlm_forward(converted):
    sd, dst, _ = converted
    net, params, meta = load_teacher_denoiser(dst)
    assert (net.layout, net.num_heads, net.max_length, net.vocab_size) == ("mdlm", H, L, V1 - 1)
    assert not net.time_conditioning and meta["diffusion"]["schedule"] == "loglinear"
    tokens = np.random.default_rng(1).integers(0, V1, (3, L))
    ours = net.apply(params, jnp.asarray(tokens), jnp.array([0.9, 0.5, 0.1]))
    ref = mdlm_forward(sd, tokens, np.zeros(3))  # sigma = 0: no time conditioning
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)
    # time-agnostic: the constant adaLN does not depend on t
    np.testing.assert_array_equal(ours[0], net.apply(params, jnp.asarray(tokens[:1]), 0.2)[0])


def test_time_conditioned_conversion_embeds_mdlm_sigma(converted):
    sd, _, root = converted
    dst = convert_mdlm.convert(
        str(root / "model.safetensors"), str(root / "tc.msgpack"), time_conditioning=True
    )
    net, params, _ = load_teacher_denoiser(dst)
    tokens = np.random.default_rng(2).integers(0, V1, (2, L))
    t = np.array([0.7, 0.2])
    sigma = -np.log1p(-(1 - 1e-3) * t)  # MDLM's log-linear noise
    ours = net.apply(params, jnp.asarray(tokens), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(ours, mdlm_forward(sd, tokens, sigma), rtol=2e-4, atol=2e-4)


def test_bfloat16_safetensors_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    path = write_safetensors(str(tmp_path / "x.safetensors"), {"x": x, "i": np.arange(3)},
                             bfloat16=True)  # fmt: skip
    back = read_safetensors(path)
    np.testing.assert_allclose(back["x"], x, rtol=2**-8)
    np.testing.assert_array_equal(back["i"], np.arange(3))


def test_converter_errors_are_one_line(tmp_path):
    sd = _state_dict()
    del sd["backbone.blocks.1.mlp.0.bias"]
    with pytest.raises(ValueError, match="lacks 'blocks.1.mlp.0.bias'"):
        convert_mdlm.mdlm_to_params(sd, H)
    sd = dict(_state_dict(), **{"backbone.extra.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="does not know: \\['extra.weight'\\]"):
        convert_mdlm.mdlm_to_params(sd, H)
    with pytest.raises(ValueError, match="rotary_emb.inv_freq"):
        convert_mdlm.mdlm_to_params(_state_dict(), 4)  # wrong head count
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(str(bad))
    assert convert_mdlm.main([str(tmp_path / "missing.safetensors"), str(tmp_path / "o")]) == 1
    try:
        import torch  # noqa: F401
    except ImportError:
        (tmp_path / "model.bin").write_bytes(b"x")
        with pytest.raises(ImportError, match="needs torch"):
            read_checkpoint(str(tmp_path / "model.bin"))


def test_mdlm_layout_trains_with_remat_and_fused_attention():
    """The 'mdlm' layout with remat and jax.nn.dot_product_attention gives the einsum path's
    logits and gradients."""
    from didistill.nets.dit import DiT

    kw = dict(vocab_size=V1 - 1, max_length=L, width=D, depth=2, num_heads=H, cond_dim=C,
              layout="mdlm")  # fmt: skip
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, V1, (2, L)))
    base = DiT(**kw)
    params = base.init(jax.random.key(0), tokens)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    loss = lambda net: lambda p: jnp.sum(jnp.tanh(net.apply(p, tokens)))
    ref_val, ref_grad = jax.value_and_grad(loss(base))(params)
    for variant in (dict(attention="xla"), dict(remat=True), dict(attention="auto", remat=True)):
        val, grad = jax.value_and_grad(loss(DiT(**kw, **variant)))(params)
        np.testing.assert_allclose(val, ref_val, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     grad, ref_grad)  # fmt: skip
    assert os.path.basename(convert_mdlm.__file__) == "convert_mdlm.py"
