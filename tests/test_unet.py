"""Tests for didistill.nets.unet (tiny widths; shapes by tracing, values with one jitted apply)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.diffusion import edm
from didistill.nets import unet

# unsafe_rbg keys compile far faster on CPU than threefry (keeps the tests quick).
rbg_key = functools.partial(jax.random.key, impl="unsafe_rbg")
TINY = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


def random_variables(template, seed=0):
    """Random params shaped like `template` (no XLA compile): kernels ~ N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, template)


def template(net, shape, labels=True):
    x = jnp.zeros(shape)
    y = jnp.zeros(shape[:1], jnp.int32) if labels else None
    return jax.eval_shape(net.init, jax.random.key(0), x, jnp.ones(shape[:1]), y)


@pytest.fixture(scope="module")
def cond():
    net = unet.UNetDenoiser(**TINY, label_dim=10, dropout=0.5)
    variables = random_variables(template(net, (2, 8, 8, 1)))

    @functools.partial(jax.jit, static_argnames="train")
    def apply(variables, x, sigma, labels, key=None, train=False):
        rngs = {"dropout": rbg_key(0) if key is None else key}
        return net.apply(variables, x, sigma, labels, train=train, features=True, rngs=rngs)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)), jnp.float32)
    return net, variables, apply, x


class TestShapes:
    @pytest.mark.parametrize(
        "res,mult,label_dim",
        [(8, (1, 2), 10), (16, (1, 2, 2), 0), (32, (1, 1, 2, 2), 10), (16, (2,), 0)],
    )
    def test_output_and_features(self, res, mult, label_dim):
        net = unet.UNetDenoiser(8, mult, num_blocks=1, attn_resolutions=(4, 8), label_dim=label_dim)
        shape = (2, res, res, 3)
        variables = template(net, shape, labels=bool(label_dim))
        labels = jnp.zeros((2,), jnp.int32) if label_dim else None
        out, feats = jax.eval_shape(
            functools.partial(net.apply, features=True), variables, jnp.zeros(shape), 1.0, labels
        )
        assert out.shape == shape and out.dtype == jnp.float32
        assert sorted(feats) == sorted(res >> lvl for lvl in range(len(mult)))
        for lvl, m in enumerate(mult):
            assert feats[res >> lvl].shape == (2, res >> lvl, res >> lvl, 8 * m)
        enc = variables["params"]["model"]["enc"]
        assert f"{res}x{res}_conv" in enc and ("map_label" in variables["params"]["model"]) == (
            label_dim > 0
        )

    def test_edm_block_names(self):
        net = unet.UNetDenoiser(**TINY, label_dim=10, augment_dim=9)
        model = template(net, (1, 8, 8, 1))["params"]["model"]
        mapping = ["map_augment", "map_label", "map_layer0", "map_layer1"]
        assert sorted(model) == ["dec", "enc", *mapping]
        assert set(model["enc"]) == {"8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"}
        dec = "4x4_in0 4x4_in1 4x4_block0 4x4_block1 8x8_up 8x8_block0 8x8_block1 8x8_aux_norm"
        assert set(model["dec"]) == {*dec.split(), "8x8_aux_conv"}
        # attention: at 4x4 in the encoder blocks, in0, and the last decoder block at 4x4 only
        assert "qkv" in model["enc"]["4x4_block0"] and "qkv" in model["dec"]["4x4_in0"]
        assert "qkv" not in model["dec"]["4x4_block0"] and "qkv" in model["dec"]["4x4_block1"]
        assert "skip" in model["enc"]["4x4_down"] and "skip" not in model["dec"]["4x4_in1"]
        assert model["map_layer0"]["kernel"].shape == (8, 32)  # noise channels -> 4 N
        assert "bias" not in model["map_augment"]

    def test_bad_inputs(self):
        net = unet.UNetDenoiser(**TINY)
        with pytest.raises(ValueError, match="divisible"):
            template(net, (1, 9, 9, 1), labels=False)
        with pytest.raises(ValueError, match="unconditional"):
            template(net, (1, 8, 8, 1), labels=True)


class TestValues:
    def test_init_is_edm_like(self, cond):
        net, _, apply, x = cond
        variables = jax.jit(net.init)(rbg_key(0), x, jnp.ones(2), None)
        model = variables["params"]["model"]
        assert np.all(model["enc"]["8x8_block0"]["norm0"]["scale"] == 1)
        assert np.all(model["enc"]["8x8_conv"]["bias"] == 0)
        assert np.max(np.abs(model["dec"]["8x8_aux_conv"]["kernel"])) < 1e-4  # xavier * 1e-5
        # F ~ 0 at init, so D(x; sigma) ~ c_skip x.
        sigma = jnp.array([0.3, 2.0])
        denoised, _ = apply(variables, x, sigma, jnp.array([1, 2]))
        c_skip = edm.preconditioning(sigma).c_skip[:, None, None, None]
        np.testing.assert_allclose(denoised, c_skip * x, atol=1e-3)

    def test_dropout_only_when_training(self, cond):
        _, variables, apply, x = cond
        sigma, labels = jnp.array([0.5, 1.5]), jnp.array([3, 7])
        key = rbg_key
        eval_a = apply(variables, x, sigma, labels, key(0))[0]
        eval_b = apply(variables, x, sigma, labels, key(1))[0]
        np.testing.assert_array_equal(eval_a, eval_b)
        train_a = apply(variables, x, sigma, labels, key(0), train=True)[0]
        train_b = apply(variables, x, sigma, labels, key(1), train=True)[0]
        train_a2 = apply(variables, x, sigma, labels, key(0), train=True)[0]
        assert np.max(np.abs(train_a - train_b)) > 1e-3
        assert np.max(np.abs(train_a - eval_a)) > 1e-3
        np.testing.assert_array_equal(train_a, train_a2)

    def test_labels(self, cond):
        _, variables, apply, x = cond
        sigma = jnp.array([0.5, 1.5])
        out_a = apply(variables, x, sigma, jnp.array([3, 7]))[0]
        out_b = apply(variables, x, sigma, jnp.array([4, 7]))[0]
        assert np.max(np.abs(out_a[0] - out_b[0])) > 1e-3  # label 3 vs 4 changes example 0
        np.testing.assert_allclose(out_a[1], out_b[1], atol=1e-5)  # example 1 unchanged
        one_hot = jax.nn.one_hot(jnp.array([3, 7]), 10)
        np.testing.assert_allclose(apply(variables, x, sigma, one_hot)[0], out_a, atol=1e-6)


class TestPieces:
    def test_positional_embedding_is_edms(self):
        c = jnp.array([-1.2, 0.0, 0.7])
        got = unet.positional_embedding(c, 8)
        freqs = (1 / 10000) ** (np.arange(4) / 3)  # endpoint=True
        angles = np.asarray(c)[:, None] * freqs
        want = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # EDM swaps cos/sin
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def test_resampling(self):
        x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
        down = unet.downsample(x)
        np.testing.assert_allclose(down[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)))
        np.testing.assert_array_equal(unet.downsample(unet.upsample(x)), x)
        assert unet.upsample(x).shape == (2, 8, 8, 3)

    def test_conv_head(self):
        feats = {8: jnp.ones((3, 8, 8, 8)), 4: jnp.ones((3, 4, 4, 16))}
        head = unet.ConvHead(width=8)
        variables = jax.eval_shape(head.init, jax.random.key(0), feats)
        logits = jax.eval_shape(head.apply, variables, feats)
        assert logits.shape == (3,)
        layers = {f"{r}x{r}_{kind}{i}" for r in (4, 8) for kind in ("conv", "norm") for i in (0, 1)}
        assert set(variables["params"]) == layers | {"out"}
        with pytest.raises(KeyError, match="16x16"):
            unet.ConvHead(resolutions=(16,)).init(jax.random.key(0), feats)
