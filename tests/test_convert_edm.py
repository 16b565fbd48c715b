"""Tests for didistill.nets.convert_edm, including a NumPy re-statement of EDM's forward pass.

`edm_reference` evaluates EDMPrecond(SongUNet ddpmpp) the way NVlabs/edm's
training/networks.py does, in NCHW on the state dict itself (EDM names and layouts, resample
buffers used as filters, qkv split by reshaping, sin/cos swap), so agreement with the Flax
U-Net checks the converter's layout mapping and the architecture together.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.nets import convert_edm
from didistill.nets.unet import UNetDenoiser

CONFIG = dict(
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.1,
    label_dim=10,
    augment_dim=3,
    img_resolution=8,
    img_channels=2,
)


def random_variables(template, seed=0):
    """Random params shaped like `template`: kernels ~ N(0, 1/fan_in), others near 1 or 0."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, template)


@pytest.fixture(scope="module")
def setup():
    net, image_shape = convert_edm.unet_from_config(CONFIG)
    variables = random_variables(convert_edm.param_template(net, image_shape))
    return net, image_shape, variables, convert_edm.export_state_dict(variables)


# ----------------------------------------------------------------------------------------------
# NumPy EDM reference (NCHW, state-dict names), following training/networks.py.


def _conv(x, w, pad):  # x [N, I, H, W], w [O, I, k, k], stride 1
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, wd = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    return sum(
        np.einsum("nihw,oi->nohw", xp[:, :, a : a + h, b : b + wd], w[:, :, a, b])
        for a in range(k)
        for b in range(k)
    )


def _resample(x, f, up):  # depthwise filter f [1, 1, 2, 2], stride 2, no padding
    n, c, h, w = x.shape
    if up:  # conv_transpose2d with f * 4
        out = np.zeros((n, c, 2 * h, 2 * w))
        for a in range(2):
            for b in range(2):
                out[:, :, a::2, b::2] += x * f[0, 0, a, b] * 4
        return out
    return sum(x[:, :, a::2, b::2] * f[0, 0, a, b] for a in range(2) for b in range(2))


def _conv2d(sd, name, x, up=False, down=False):
    if up or down:
        x = _resample(x, sd[f"{name}.resample_filter"], up)
    w = sd[f"{name}.weight"]
    return _conv(x, w, w.shape[-1] // 2) + sd[f"{name}.bias"][None, :, None, None]


def _group_norm(sd, name, x, eps=1e-6):
    n, c = x.shape[:2]
    g = min(32, c // 4)
    xg = x.reshape(n, g, -1)
    xg = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
    return (
        xg.reshape(x.shape) * sd[f"{name}.weight"][None, :, None, None]
        + sd[f"{name}.bias"][None, :, None, None]
    )


def _linear(sd, name, x):
    out = x @ sd[f"{name}.weight"].T
    return out + sd[f"{name}.bias"] if f"{name}.bias" in sd else out


def _silu(x):
    return x / (1 + np.exp(-x))


def _block(sd, name, x, emb):
    up, down = name.endswith("_up"), name.endswith("_down")
    orig = x
    x = _conv2d(sd, f"{name}.conv0", _silu(_group_norm(sd, f"{name}.norm0", x)), up, down)
    x = _silu(
        _group_norm(sd, f"{name}.norm1", x + _linear(sd, f"{name}.affine", emb)[..., None, None])
    )
    x = _conv2d(sd, f"{name}.conv1", x)
    skip = _conv2d(sd, f"{name}.skip", orig, up, down) if f"{name}.skip.weight" in sd else orig
    x = (x + skip) * np.sqrt(0.5)
    if f"{name}.qkv.weight" in sd:
        n, c, h, w = x.shape
        qkv = _conv2d(sd, f"{name}.qkv", _group_norm(sd, f"{name}.norm2", x))
        q, k, v = np.moveaxis(qkv.reshape(n, c, 3, h * w), 2, 0)  # one head
        logits = np.einsum("ncq,nck->nqk", q, k / np.sqrt(c))
        wts = np.exp(logits - logits.max(2, keepdims=True))
        wts /= wts.sum(2, keepdims=True)
        a = np.einsum("nqk,nck->ncq", wts, v).reshape(x.shape)
        x = (_conv2d(sd, f"{name}.proj", a) + x) * np.sqrt(0.5)
    return x


def edm_reference(sd, x, sigma, labels, cfg, sigma_data=0.5):
    """EDMPrecond(SongUNet ddpmpp).forward, NCHW, dropout off, no augmentation labels."""
    sd = {k.removeprefix("model."): np.asarray(v, np.float64) for k, v in sd.items()}
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / np.sqrt(sigma_data**2 + sigma**2)
    c_noise = np.log(sigma).ravel() / 4
    n_ch = cfg["model_channels"]
    freqs = (1 / 10000) ** (np.arange(n_ch // 2) / (n_ch // 2 - 1))
    emb = np.outer(c_noise, freqs)
    emb = np.concatenate([np.cos(emb), np.sin(emb)], axis=1)
    emb = emb.reshape(emb.shape[0], 2, -1)[:, ::-1].reshape(emb.shape)  # swap sin/cos
    emb = emb + _linear(sd, "map_label", labels * np.sqrt(labels.shape[1]))
    emb = _silu(_linear(sd, "map_layer1", _silu(_linear(sd, "map_layer0", emb))))
    h = c_in * x
    res0, levels, skips = h.shape[2], len(cfg["channel_mult"]), []
    for level in range(levels):  # encoder, in EDM's construction order
        r = res0 >> level
        names = [f"{r}x{r}_conv" if level == 0 else f"{r}x{r}_down"]
        for name in names + [f"{r}x{r}_block{i}" for i in range(cfg["num_blocks"])]:
            h = (
                _conv2d(sd, f"enc.{name}", h)
                if name.endswith("conv")
                else _block(sd, f"enc.{name}", h, emb)
            )
            skips.append(h)
    for level in reversed(range(levels)):  # decoder
        r = res0 >> level
        names = [f"{r}x{r}_in0", f"{r}x{r}_in1"] if level == levels - 1 else [f"{r}x{r}_up"]
        for name in names + [f"{r}x{r}_block{i}" for i in range(cfg["num_blocks"] + 1)]:
            if h.shape[1] != sd[f"dec.{name}.norm0.weight"].shape[0]:
                h = np.concatenate([h, skips.pop()], axis=1)
            h = _block(sd, f"dec.{name}", h, emb)
    h = _silu(_group_norm(sd, f"dec.{res0}x{res0}_aux_norm", h))
    return c_skip * x + c_out * _conv2d(sd, f"dec.{res0}x{res0}_aux_conv", h)


# ----------------------------------------------------------------------------------------------


class TestRoundTrip:
    def test_names_and_layouts_are_edms(self, setup):
        _, _, variables, sd = setup
        model = variables["params"]["model"]
        assert sd["model.enc.8x8_conv.weight"].shape == (8, 2, 3, 3)  # OIHW
        np.testing.assert_array_equal(
            sd["model.enc.8x8_conv.weight"],
            np.transpose(model["enc"]["8x8_conv"]["kernel"], (3, 2, 0, 1)),
        )
        assert sd["model.map_label.weight"].shape == (8, 10)  # [out, in]
        assert sd["model.map_augment.weight"].shape == (8, 3)
        assert "model.map_augment.bias" not in sd
        assert sd["model.dec.4x4_in0.norm0.weight"].shape == (16,)
        np.testing.assert_array_equal(
            sd["model.enc.4x4_down.skip.resample_filter"], np.full((1, 1, 2, 2), 0.25)
        )
        assert "model.dec.8x8_up.conv0.resample_filter" in sd
        assert not any(k.startswith("model.map_noise") for k in sd)  # positional: no params

    def test_round_trip_is_exact(self, setup):
        net, image_shape, variables, sd = setup
        template = convert_edm.param_template(net, image_shape)
        back = convert_edm.convert_state_dict(sd, template)
        jax.tree.map(np.testing.assert_array_equal, back, variables)
        assert jax.tree.structure(back) == jax.tree.structure(variables)
        again = convert_edm.export_state_dict(back)
        assert sorted(again) == sorted(sd)

    def test_matches_edm_reference(self, setup):
        net, image_shape, variables, sd = setup
        rng = np.random.default_rng(3)
        x = rng.normal(size=(2, *image_shape)).astype(np.float32)  # NHWC
        sigma = np.array([0.2, 3.0], np.float32)
        labels = np.array([4, 9])
        back = convert_edm.convert_state_dict(sd, convert_edm.param_template(net, image_shape))
        ours = jax.jit(net.apply)(back, x, sigma, labels)
        one_hot = np.eye(10)[labels]
        want = edm_reference(sd, x.transpose(0, 3, 1, 2).astype(np.float64), sigma, one_hot, CONFIG)
        np.testing.assert_allclose(
            np.asarray(ours), want.transpose(0, 2, 3, 1), atol=2e-4, rtol=1e-4
        )


class TestErrors:
    def convert(self, setup, sd):
        net, image_shape, _, _ = setup
        return convert_edm.convert_state_dict(sd, convert_edm.param_template(net, image_shape))

    def test_missing(self, setup):
        sd = dict(setup[3])
        del sd["model.dec.4x4_in0.qkv.weight"]
        with pytest.raises(
            convert_edm.StateDictError, match=r"missing array 'model.dec.4x4_in0.qkv.weight'"
        ):
            self.convert(setup, sd)

    def test_wrong_shape(self, setup):
        sd = dict(setup[3], **{"model.map_layer0.weight": np.zeros((32, 9), np.float32)})
        with pytest.raises(
            convert_edm.StateDictError,
            match=r"'model.map_layer0.weight' has shape \(32, 9\), expected \(32, 8\)",
        ):
            self.convert(setup, sd)

    def test_extra_and_bad_filter(self, setup):
        sd = dict(setup[3])
        sd["model.map_noise.freqs"] = np.zeros(4, np.float32)  # an NCSN++ buffer
        sd["model.enc.4x4_down.conv0.resample_filter"] = np.full((1, 1, 2, 2), 0.5, np.float32)
        with pytest.raises(convert_edm.StateDictError) as err:
            self.convert(setup, sd)
        assert "unexpected array 'model.map_noise.freqs'" in str(err.value)
        assert "'model.enc.4x4_down.conv0.resample_filter' is not the DDPM++" in str(err.value)
        assert "2 problem(s)" in str(err.value)


class TestFiles:
    def test_cli_and_load(self, setup, tmp_path, capsys):
        _, _, variables, sd = setup
        npz, out = tmp_path / "edm.npz", tmp_path / "net.msgpack"
        np.savez(npz, **sd)
        convert_edm.main([str(npz), str(out), "--config", json.dumps(CONFIG)])
        assert "parameters" in capsys.readouterr().out
        net, loaded, meta = convert_edm.load_unet(str(out))
        assert isinstance(net, UNetDenoiser) and net.label_dim == 10 and net.channel_mult == (1, 2)
        assert meta["net"]["arch"] == "unet" and meta["source"] == "edm.npz"
        jax.tree.map(np.testing.assert_array_equal, loaded, variables)
        from didistill.nets.files import load_model  # the one network-file format

        module, params, file_meta = load_model(str(out), "unet")
        assert file_meta == meta and isinstance(module, UNetDenoiser)
        jax.tree.map(np.testing.assert_array_equal, params, variables)

    def test_cli_reports_mismatch(self, setup, tmp_path):
        sd = dict(setup[3])
        del sd["model.map_label.bias"]
        npz = tmp_path / "bad.npz"
        np.savez(npz, **sd)
        with pytest.raises(SystemExit, match="missing array 'model.map_label.bias'"):
            convert_edm.main(
                [str(npz), str(tmp_path / "x.msgpack"), "--config", json.dumps(CONFIG)]
            )
        assert not (tmp_path / "x.msgpack").exists()

    def test_presets(self):
        net, shape = convert_edm.unet_from_config(convert_edm.PRESETS["edm-cifar10-cond"])
        assert shape == (32, 32, 3) and net.augment_dim == 9 and net.label_dim == 10
        count = sum(
            int(np.prod(v.shape)) for v in jax.tree.leaves(convert_edm.param_template(net, shape))
        )
        assert 55e6 < count < 57e6  # EDM's DDPM++ CIFAR-10 network has about 56M parameters
        with pytest.raises(ValueError, match="unknown U-Net config keys"):
            convert_edm.unet_from_config({"model_chanels": 8})
