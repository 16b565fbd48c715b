"""One-step distillation on images: every method steps under jit with a tiny random U-Net
teacher (a network file), conditional and unconditional, on random data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import digits_distill
from didistill.data import images
from didistill.distill import get_method
from tests.teachers import RBG, random_data, save_tiny_unet_teacher


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
    teacher = save_tiny_unet_teacher(tmp_path / "teacher.msgpack", label_dim=label_dim)
    fake_data["data"] = random_data((8, 8, 1), 10)
    config = digits_distill.get_config(f"{arg},smoke")
    config.teacher.checkpoint = teacher
    config.discriminator.resolutions = (8,)
    _, _, batch = run_two_steps(config)
    assert batch["x"].shape == (4, 1, 8, 8, 1)
    assert ("label" in batch) == bool(label_dim)
