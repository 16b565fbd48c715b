"""One-step distillation on images: every method steps under jit with a tiny random U-Net
teacher (a network file), conditional and unconditional, on random data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import digits_distill
from didistill.data import images
from didistill.distill import get_method
from didistill.nets.convert_edm import unet_from_config
from didistill.nets.files import save_model

RBG = dict(impl="unsafe_rbg")  # cheap to compile on CPU


def save_tiny_teacher(path, resolution=8, channels=1, label_dim=0, channel_mult=(1,)):
    """A random-weight U-Net saved as a network file; returns the path."""
    cfg = dict(
        model_channels=8,
        channel_mult=list(channel_mult),
        channel_mult_emb=1,
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        label_dim=label_dim,
        img_resolution=resolution,
        img_channels=channels,
    )
    net, shape = unet_from_config(cfg)
    labels = jnp.zeros((1,), jnp.int32) if label_dim else None
    init = jax.jit(lambda k: net.init(k, jnp.zeros((1, *shape)), jnp.ones((1,)), labels))
    variables = init(jax.random.key(0, **RBG))
    # Give the zero-initialised output layers some weight, so the generator is not ~constant.
    variables = jax.tree.map(
        lambda v: v + 0.05 * jnp.sign(jnp.sin(jnp.arange(v.size))).reshape(v.shape), variables
    )
    return save_model(str(path), variables, cfg, "unet")


def random_data(shape, num_classes):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (64, *shape)).astype(np.float32)
    return {"image": image, "label": rng.integers(0, num_classes, 64).astype(np.int32)}


@pytest.fixture
def fake_data(monkeypatch):
    """Replaces the dataset with random arrays of the teacher's shape (set by the test)."""
    holder = {}
    monkeypatch.setattr(images, "load_arrays", lambda data_cfg, split="train": holder["data"])
    return holder


def run_two_steps(config):
    method = get_method(config)
    state0 = method.init(jax.random.key(0, **RBG))
    batch = next(method.batches(0))
    step = jax.jit(method.step)
    state = state0
    for i in range(2):
        state, metrics = step(state, batch, jax.random.key(i, **RBG), jnp.int32(i))
    for name, value in metrics.items():
        assert np.isfinite(value), (name, value)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.generator, state0.generator)
    assert any(jax.tree.leaves(moved)), "the generator did not move"
    return method, state, batch


@pytest.mark.parametrize(
    "arg,label_dim",
    [("jensen_shannon", 0), ("dmd2", 10), ("sid", 0), ("uni_instruct,forward_kl", 10)],
)
def test_every_method_steps_under_jit(arg, label_dim, tmp_path, fake_data):
    teacher = save_tiny_teacher(tmp_path / "teacher.msgpack", label_dim=label_dim)
    fake_data["data"] = random_data((8, 8, 1), 10)
    config = digits_distill.get_config(f"{arg},smoke")
    config.teacher.checkpoint = teacher
    config.discriminator.resolutions = (8,)
    _, _, batch = run_two_steps(config)
    assert batch["x"].shape == (4, 1, 8, 8, 1)
    assert ("label" in batch) == bool(label_dim)
