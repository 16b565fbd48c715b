"""Tests for didistill.nets.adm (EDM's DhariwalUNet) and its path through convert_edm.

`adm_reference` evaluates EDMPrecond(DhariwalUNet) the way NVlabs/edm's training/networks.py
does, in NCHW on the state dict itself (EDM names and layouts, resample buffers used as
filters, multi-head qkv split by reshaping, adaptive scale/shift, cos-first embedding without
endpoint), so agreement with the Flax network checks the architecture and the converter's
mapping together. Networks are tiny; the full ImageNet-64 preset is only traced for shapes.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.nets import convert_edm
from didistill.nets.adm import ADMDenoiser
from didistill.nets.files import save_model
from tests.test_convert_edm import (
    _conv2d,
    _group_norm,
    _linear,
    _resample,
    _silu,
    random_variables,
)

CONFIG = dict(  # 16x16, levels 16 and 8, attention (4 heads of 8 channels) at 8
    arch="adm",
    model_channels=16,
    channel_mult=[1, 2],
    channel_mult_emb=2,
    num_blocks=1,
    attn_resolutions=[8],
    dropout=0.1,
    label_dim=10,
    augment_dim=2,
    channels_per_head=8,
    img_resolution=16,
    img_channels=3,
)


def save_tiny_adm_teacher(path, resolution, label_dim, channel_mult=(1,), attn_resolutions=()):
    """A random-weight ADM saved as a network file (no XLA compile); returns the path. Its
    16-channel blocks get attention (heads of 8 channels) only when `attn_resolutions` is given;
    otherwise heads of EDM's 64 channels leave them none, the coarsest 'in0' block included."""
    cfg = dict(
        CONFIG,
        channels_per_head=8 if attn_resolutions else 64,
        channel_mult=list(channel_mult),
        attn_resolutions=list(attn_resolutions),
        dropout=0.0,
        label_dim=label_dim,
        augment_dim=0,
        img_resolution=resolution,
    )
    net, shape = convert_edm.unet_from_config(cfg)
    variables = random_variables(convert_edm.param_template(net, shape))
    return save_model(str(path), variables, cfg, "adm")


@pytest.fixture(scope="module")
def setup():
    net, image_shape = convert_edm.unet_from_config(CONFIG)
    variables = random_variables(convert_edm.param_template(net, image_shape))
    apply = jax.jit(net.apply, static_argnames=("train", "features"))
    return net, image_shape, variables, convert_edm.export_state_dict(variables), apply


# ----------------------------------------------------------------------------------------------
# NumPy EDM reference (NCHW, state-dict names), following DhariwalUNet in training/networks.py.


def _adm_block(sd, name, x, emb, channels_per_head):
    up, down = name.endswith("_up"), name.endswith("_down")
    orig = x
    x = _conv2d(sd, f"{name}.conv0", _silu(_group_norm(sd, f"{name}.norm0", x, 1e-5)), up, down)
    scale, shift = np.split(_linear(sd, f"{name}.affine", emb)[..., None, None], 2, axis=1)
    x = _silu(shift + _group_norm(sd, f"{name}.norm1", x, 1e-5) * (scale + 1))
    x = _conv2d(sd, f"{name}.conv1", x)
    if f"{name}.skip.weight" in sd:
        x = x + _conv2d(sd, f"{name}.skip", orig, up, down)
    elif up or down:  # kernel-0 skip: the resample filter alone
        x = x + _resample(orig, sd[f"{name}.skip.resample_filter"], up)
    else:
        x = x + orig
    if f"{name}.qkv.weight" in sd:
        n, c, h, w = x.shape
        heads = c // channels_per_head
        qkv = _conv2d(sd, f"{name}.qkv", _group_norm(sd, f"{name}.norm2", x, 1e-5))
        q, k, v = np.moveaxis(qkv.reshape(n * heads, c // heads, 3, h * w), 2, 0)
        logits = np.einsum("ncq,nck->nqk", q, k / np.sqrt(c // heads))
        wts = np.exp(logits - logits.max(2, keepdims=True))
        wts /= wts.sum(2, keepdims=True)
        a = np.einsum("nqk,nck->ncq", wts, v).reshape(x.shape)
        x = _conv2d(sd, f"{name}.proj", a) + x
    return x


def adm_reference(sd, x, sigma, labels, cfg, sigma_data=0.5):
    """EDMPrecond(DhariwalUNet).forward, NCHW, dropout off, no augmentation labels."""
    sd = {k.removeprefix("model."): np.asarray(v, np.float64) for k, v in sd.items()}
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / np.sqrt(sigma_data**2 + sigma**2)
    c_noise = np.log(sigma).ravel() / 4
    half = cfg["model_channels"] // 2
    angles = np.outer(c_noise, (1 / 10000) ** (np.arange(half) / half))  # endpoint=False
    emb = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    emb = _linear(sd, "map_layer1", _silu(_linear(sd, "map_layer0", emb)))
    emb = _silu(emb + _linear(sd, "map_label", labels))
    block = lambda name, h: _adm_block(sd, name, h, emb, cfg["channels_per_head"])
    h = c_in * x
    res0, levels, skips = h.shape[2], len(cfg["channel_mult"]), []
    for level in range(levels):  # encoder, in EDM's construction order
        r = res0 >> level
        h = _conv2d(sd, f"enc.{r}x{r}_conv", h) if level == 0 else block(f"enc.{r}x{r}_down", h)
        skips.append(h)
        for i in range(cfg["num_blocks"]):
            h = block(f"enc.{r}x{r}_block{i}", h)
            skips.append(h)
    for level in reversed(range(levels)):  # decoder
        r = res0 >> level
        names = [f"{r}x{r}_in0", f"{r}x{r}_in1"] if level == levels - 1 else [f"{r}x{r}_up"]
        for name in names + [f"{r}x{r}_block{i}" for i in range(cfg["num_blocks"] + 1)]:
            if h.shape[1] != sd[f"dec.{name}.norm0.weight"].shape[0]:
                h = np.concatenate([h, skips.pop()], axis=1)
            h = block(f"dec.{name}", h)
    h = _silu(_group_norm(sd, "out_norm", h, 1e-5))
    return c_skip * x + c_out * _conv2d(sd, "out_conv", h)


# ----------------------------------------------------------------------------------------------


class TestNetwork:
    def test_shapes_and_features(self, setup):
        net, image_shape, variables, _, apply = setup
        x = jnp.ones((2, *image_shape))
        out, feats = apply(variables, x, jnp.array([0.5, 2.0]), jnp.array([1, 2]), features=True)
        assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
        assert {r: f.shape for r, f in feats.items()} == {16: (2, 16, 16, 16), 8: (2, 8, 8, 32)}

    def test_matches_edm_reference(self, setup):
        net, image_shape, variables, sd, apply = setup
        rng = np.random.default_rng(3)
        x = rng.normal(size=(2, *image_shape)).astype(np.float32)  # NHWC
        sigma = np.array([0.2, 3.0], np.float32)
        labels = np.array([4, 9])
        ours = apply(variables, x, sigma, labels)
        x_nchw = x.transpose(0, 3, 1, 2).astype(np.float64)
        want = adm_reference(sd, x_nchw, sigma, np.eye(10)[labels], CONFIG)
        np.testing.assert_allclose(
            np.asarray(ours), want.transpose(0, 2, 3, 1), atol=2e-4, rtol=1e-4
        )

    def test_class_conditioning(self, setup):
        net, image_shape, variables, _, apply = setup
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *image_shape)), jnp.float32)
        sigma = jnp.array([1.0, 1.0])
        by_index = apply(variables, x, sigma, jnp.array([3, 7]))
        by_one_hot = apply(variables, x, sigma, jax.nn.one_hot(jnp.array([3, 7]), 10))
        np.testing.assert_array_equal(by_index, by_one_hot)
        other = apply(variables, x, sigma, jnp.array([5, 7]))
        assert float(jnp.abs(other[0] - by_index[0]).max()) > 1e-4  # the label matters
        np.testing.assert_allclose(other[1], by_index[1], atol=1e-6)  # per example
        none = apply(variables, x, sigma, None)  # zeros, like EDM
        np.testing.assert_array_equal(none, apply(variables, x, sigma, jnp.zeros((2, 10))))
        with pytest.raises(ValueError, match="unconditional ADMDenoiser"):
            ADMDenoiser(16, (1,), label_dim=0).init(jax.random.key(0), x, sigma, jnp.array([1, 2]))

    def test_no_attention_below_one_head(self):
        """EDM gives C // 64 heads, so a block narrower than 64 channels has no attention."""
        net = ADMDenoiser(16, (1, 2), num_blocks=1, attn_resolutions=(8,))
        names = convert_edm.state_dict_shapes(convert_edm.param_template(net, (16, 16, 3)))
        assert not any(".qkv." in n for n in names)


class TestConversion:
    def test_round_trip_is_bit_identical(self, setup, tmp_path):
        net, image_shape, variables, sd, apply = setup
        assert sd["model.map_label.weight"].shape == (32, 10)  # [E, L], no bias
        assert "model.map_label.bias" not in sd and "model.map_augment.bias" not in sd
        assert "model.enc.8x8_down.skip.resample_filter" in sd
        assert "model.enc.8x8_down.skip.weight" not in sd  # kernel-0 skip of ADM
        assert sd["model.dec.8x8_in0.qkv.weight"].shape == (96, 32, 1, 1)
        assert sorted(sd) == sorted(convert_edm.state_dict_shapes(variables))
        npz, out = tmp_path / "edm.npz", tmp_path / "adm.msgpack"
        np.savez(npz, **sd)
        convert_edm.main([str(npz), str(out), "--config", json.dumps(CONFIG)])
        loaded_net, loaded, meta = convert_edm.load_unet(str(out))
        assert isinstance(loaded_net, ADMDenoiser) and loaded_net.channels_per_head == 8
        assert meta["net"]["arch"] == "adm" and meta["source"] == "edm.npz"
        jax.tree.map(np.testing.assert_array_equal, loaded, variables)
        x = jnp.asarray(np.random.default_rng(2).normal(size=(2, *image_shape)), jnp.float32)
        args = (x, jnp.array([0.3, 7.0]), jnp.array([0, 9]))
        np.testing.assert_array_equal(apply(loaded, *args), apply(variables, *args))

    def test_missing_and_misshaped(self, setup):
        net, image_shape, _, sd, _ = setup
        template = convert_edm.param_template(net, image_shape)
        sd = dict(sd, **{"model.map_label.weight": np.zeros((32, 11), np.float32)})
        del sd["model.out_conv.bias"]
        with pytest.raises(convert_edm.StateDictError) as err:
            convert_edm.convert_state_dict(sd, template)
        assert "missing array 'model.out_conv.bias'" in str(err.value)
        assert "'model.map_label.weight' has shape (32, 11), expected (32, 10)" in str(err.value)
        assert "2 problem(s)" in str(err.value)

    def test_unet_file_is_not_adm(self, setup):
        """A DDPM++ state dict converted with an ADM config names what does not fit."""
        from tests.test_convert_edm import CONFIG as UNET_CONFIG

        unet, shape = convert_edm.unet_from_config(UNET_CONFIG)
        unet_sd = convert_edm.export_state_dict(
            random_variables(convert_edm.param_template(unet, shape))
        )
        adm, adm_shape = convert_edm.unet_from_config(dict(CONFIG, img_channels=2))
        with pytest.raises(convert_edm.StateDictError, match="unexpected array 'model.dec"):
            convert_edm.convert_state_dict(unet_sd, convert_edm.param_template(adm, adm_shape))
        with pytest.raises(ValueError, match="unknown U-Net arch 'ncsnpp'"):
            convert_edm.unet_from_config(dict(CONFIG, arch="ncsnpp"))
        with pytest.raises(ValueError, match="unknown U-Net config keys"):
            convert_edm.unet_from_config(dict(UNET_CONFIG, channels_per_head=8))


def edm_adm_parameter_count(
    res=64, cin=3, n=192, mult=(1, 2, 3, 4), emb_mult=4, blocks=3, attn=(32, 16, 8), labels=1000
):
    """Parameters of EDM's DhariwalUNet counted from its constructor, layer by layer."""
    emb = n * emb_mult
    conv = lambda i, o, k: o * i * k * k + o  # weight [o, i, k, k] + bias
    norm = lambda c: 2 * c

    def block(i, o, attention=False):  # UNetBlock(adaptive_scale=True, resample_proj=False)
        count = norm(i) + conv(i, o, 3) + (emb * 2 * o + 2 * o) + norm(o) + conv(o, o, 3)
        count += conv(i, o, 1) if i != o else 0  # up/down blocks keep channels: no skip weight
        if attention and o // 64:  # C // 64 heads
            count += norm(o) + conv(o, 3 * o, 1) + conv(o, o, 1)
        return count

    total = (n * emb + emb) + (emb * emb + emb) + labels * emb  # map_layer0/1, map_label
    skips, c = [], cin
    for level, m in enumerate(mult):  # encoder
        r = res >> level
        total += conv(c, n * m, 3) if level == 0 else block(c, c)
        c = n * m if level == 0 else c
        skips.append(c)
        for _ in range(blocks):
            total, c = total + block(c, n * m, r in attn), n * m
            skips.append(c)
    for level in reversed(range(len(mult))):  # decoder
        r = res >> level
        total += block(c, c, True) + block(c, c) if level == len(mult) - 1 else block(c, c)
        for _ in range(blocks + 1):
            i = c + skips.pop()
            total, c = total + block(i, n * mult[level], r in attn), n * mult[level]
    return total + norm(c) + conv(c, cin, 3)  # out_norm, out_conv


class TestImageNet64Preset:
    @pytest.fixture(scope="class")
    def template(self):
        net, shape = convert_edm.unet_from_config(convert_edm.PRESETS["edm-imagenet64-cond"])
        assert isinstance(net, ADMDenoiser) and shape == (64, 64, 3)
        return convert_edm.param_template(net, shape)  # shapes only: nothing is allocated

    def test_parameter_count(self, template):
        """EDM's ImageNet-64 ADM has 295,899,267 parameters: the layer-by-layer count of
        DhariwalUNet's constructor (`edm_adm_parameter_count`) and the traced Flax tree agree;
        about 296M as EDM reports."""
        count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(template))
        assert edm_adm_parameter_count() == 295_899_267
        assert count == 295_899_267

    def test_state_dict_names(self, template):
        shapes = convert_edm.state_dict_shapes(template)
        assert shapes["model.map_label.weight"] == (768, 1000)
        assert "model.map_label.bias" not in shapes
        assert shapes["model.map_layer0.weight"] == (768, 192)
        assert shapes["model.enc.64x64_conv.weight"] == (192, 3, 3, 3)
        assert shapes["model.enc.64x64_block0.norm0.weight"] == (192,)
        assert shapes["model.enc.64x64_block0.affine.weight"] == (384, 768)  # scale and shift
        assert "model.enc.64x64_block0.qkv.weight" not in shapes  # no attention at 64
        assert shapes["model.enc.32x32_block0.skip.weight"] == (384, 192, 1, 1)
        assert shapes["model.enc.32x32_block0.qkv.weight"] == (1152, 384, 1, 1)
        assert shapes["model.enc.32x32_down.skip.resample_filter"] == (1, 1, 2, 2)
        assert "model.enc.32x32_down.skip.weight" not in shapes
        assert shapes["model.dec.8x8_in0.qkv.weight"] == (2304, 768, 1, 1)
        assert "model.dec.8x8_in1.qkv.weight" not in shapes
        assert shapes["model.dec.8x8_block0.norm0.weight"] == (1536,)
        assert shapes["model.dec.64x64_block3.norm0.weight"] == (384,)
        assert "model.dec.64x64_block3.qkv.weight" not in shapes
        assert shapes["model.dec.8x8_block3.qkv.weight"] == (2304, 768, 1, 1)  # every dec block
        assert shapes["model.out_norm.weight"] == (192,)
        assert shapes["model.out_conv.weight"] == (3, 192, 3, 3)
        assert not any(k.startswith(("model.map_noise", "model.map_augment")) for k in shapes)

    def test_features_at_8(self):
        net, shape = convert_edm.unet_from_config(convert_edm.PRESETS["edm-imagenet64-cond"])
        x = jnp.zeros((1, *shape))
        variables = convert_edm.param_template(net, shape)
        feats = jax.eval_shape(
            lambda v: net.apply(v, x, jnp.ones((1,)), jnp.zeros((1,), jnp.int32), features=True),
            variables,
        )[1]
        assert {r: f.shape for r, f in feats.items()} == {
            64: (1, 64, 64, 192),
            32: (1, 32, 32, 384),
            16: (1, 16, 16, 576),
            8: (1, 8, 8, 768),
        }
