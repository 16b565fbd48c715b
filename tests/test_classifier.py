"""Tests for didistill.nets.classifier."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.nets.classifier import Classifier, make_classifier, num_params

NETS = {
    "mlp": (Classifier(num_classes=10, kind="mlp", widths=(16, 8)), 8),
    "linear": (Classifier(num_classes=7, kind="mlp", widths=()), 64),  # features = pixels
    "cnn": (Classifier(num_classes=10, kind="cnn", widths=(2, 3, 4, 5), hidden=6), 6),
}


@functools.cache
def _init(name):
    """(net, x [3, 8, 8, 1], params): shapes from `eval_shape(init)`, values from NumPy (XLA's
    CPU compile of the random initialisers takes seconds; the tests need only shapes)."""
    net = NETS[name][0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
    shapes = jax.eval_shape(net.init, jax.random.key(1), x)
    params = jax.tree.map(lambda s: 0.3 * rng.normal(size=s.shape).astype(np.float32), shapes)
    return net, x, params


def _apply(net, params, x, **kwargs):
    return jax.jit(net.apply, static_argnames=("train", "features"))(params, x, **kwargs)


class TestClassifier:
    @pytest.mark.parametrize("name", sorted(NETS))
    def test_shapes_and_features(self, name):
        net, x, params = _init(name)
        logits = _apply(net, params, x)
        assert logits.shape == (3, net.num_classes) and logits.dtype == jnp.float32
        logits2, feats = _apply(net, params, x, features=True)
        assert feats.shape == (3, NETS[name][1])
        np.testing.assert_allclose(logits, logits2, rtol=1e-6)
        # the logits are an affine function of the features (the penultimate layer)
        head = params["params"]["logits"]
        np.testing.assert_allclose(
            logits, feats @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
        )

    def test_cnn_pools_to_one_pixel(self):
        _, _, params = _init("cnn")
        # 8 -> 4 -> 2 -> 1 -> 1: the dense feature layer sees 1 * 1 * 5 inputs
        assert params["params"]["Dense_0"]["kernel"].shape == (5, 6)

    def test_flat_inputs_and_batch_independence(self):
        net, x, params = _init("mlp")
        full = _apply(net, params, x)
        np.testing.assert_allclose(_apply(net, params, x.reshape(3, -1)), full, rtol=1e-6)
        np.testing.assert_allclose(_apply(net, params, x[:1]), full[:1], rtol=1e-5, atol=1e-6)

    def test_dropout_only_in_training(self):
        _, x, params = _init("mlp")
        net = Classifier(num_classes=10, kind="mlp", widths=(16, 8), dropout=0.5)
        np.testing.assert_allclose(
            _apply(net, params, x), _apply(NETS["mlp"][0], params, x), rtol=1e-6
        )
        a = _apply(net, params, x, train=True, rngs={"dropout": jax.random.key(2)})
        b = _apply(net, params, x, train=True, rngs={"dropout": jax.random.key(3)})
        assert not np.allclose(a, b)

    def test_num_params(self):
        _, _, params = _init("mlp")
        assert num_params(params) == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10


class TestMakeClassifier:
    def test_from_config_dict(self):
        net = make_classifier(
            {"kind": "cnn", "widths": [4, 8], "hidden": 16, "num_classes": 3, "dropout": 0.1}
        )
        assert net == Classifier(num_classes=3, kind="cnn", widths=(4, 8), hidden=16, dropout=0.1)

    @pytest.mark.parametrize(
        "cfg,match",
        [
            ({"kind": "resnet"}, "net.kind"),
            ({"widths": (0,)}, "net.widths"),
            ({"num_classes": 1}, "num_classes"),
            ({"dropout": 1.0}, "net.dropout"),
        ],
    )
    def test_bad_config(self, cfg, match):
        with pytest.raises(ValueError, match=match):
            make_classifier(cfg)

    def test_bad_kind_in_module(self):
        with pytest.raises(ValueError, match="kind"):
            Classifier(kind="rnn").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
