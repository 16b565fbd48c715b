"""EDM teacher on images: the jitted step lowers the loss, evaluate writes a PNG grid and a
U-Net file that `load_unet` rebuilds."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import digits_teacher
from didistill.distill import get_method
from didistill.distill.teachers import images as image_teacher
from didistill.nets.convert_edm import load_unet

RBG = dict(impl="unsafe_rbg")  # cheap to compile on CPU


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Eight steps of the smoke teacher on the real digits, same batch and key each step."""
    config = digits_teacher.get_config("smoke")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.optim.warmup_steps, config.optim.learning_rate = 0, 3e-3
    method = get_method(config)
    state = method.init(jax.random.key(0, **RBG))
    batch = next(method.batches(0))
    step = jax.jit(method.step)
    key, losses = jax.random.key(1, **RBG), []
    for i in range(8):
        state, metrics = step(state, batch, key, jnp.int32(i))
        losses.append(float(metrics["loss"]))
    return config, method, state, batch, losses


def test_batches_are_digits_with_labels(trained):
    _, _, _, batch, _ = trained
    assert batch["x"].shape == (16, 8, 8, 1) and batch["label"].shape == (16,)
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0


def test_step_lowers_the_loss(trained):
    losses = trained[-1]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0], losses


def test_evaluate_writes_grid_and_loadable_unet(trained, tmp_path):
    config, method, state, _, _ = trained
    results = method.evaluate(state, jax.random.key(2), str(tmp_path))
    assert results["teacher/nfe"] == config.eval.nfe
    assert np.isfinite(results["teacher/pixel_std"])
    assert os.path.getsize(tmp_path / "samples.png") > 0
    net, variables, meta = load_unet(str(tmp_path / image_teacher.TEACHER_FILE))
    assert meta["net"]["label_dim"] == 10 and meta["net"]["img_resolution"] == 8
    x, sigma, labels = jnp.ones((2, 8, 8, 1)), jnp.ones((2,)), jnp.array([0, 3])
    expected = net.apply(state.ema_params, x, sigma, labels)
    np.testing.assert_allclose(net.apply(variables, x, sigma, labels), expected, atol=1e-6)


def test_save_image_grid(tmp_path):
    from PIL import Image

    from didistill.eval.plots import save_image_grid

    path = save_image_grid(np.zeros((5, 8, 8, 3)), str(tmp_path / "g.png"), 2)
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size[0] > 0


def test_config_flags():
    assert digits_teacher.get_config("uncond").net.label_dim == 0
    with pytest.raises(ValueError, match="flags"):
        digits_teacher.get_config("bogus")


def test_feature_fid_with_a_digits_classifier(trained, tmp_path):
    from didistill.data.images import load_arrays
    from didistill.eval.fid import classifier_fid
    from didistill.nets.classifier import make_classifier
    from didistill.nets.files import save_model

    config = trained[0].copy_and_resolve_references()
    assert classifier_fid(config) is None  # smoke: no feature checkpoint
    net_cfg = {"kind": "mlp", "widths": [16], "num_classes": 10}
    params = make_classifier(net_cfg).init(jax.random.key(0, **RBG), jnp.zeros((1, 8, 8, 1)))
    config.eval.feature_checkpoint = save_model(
        str(tmp_path / "clf.msgpack"), params, net_cfg, "classifier"
    )
    fid_fn = classifier_fid(config)
    test_images = load_arrays(config.data, "test")["image"]
    assert abs(fid_fn(test_images)) < 1e-3  # the reference against itself
    assert fid_fn(np.zeros_like(test_images)) > 1e-2
