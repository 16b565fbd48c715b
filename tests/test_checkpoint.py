"""The orbax wrapper: round trips of the engine state, corrupt and incompatible checkpoints."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.train import sharding
from didistill.train.checkpoint import Checkpointer
from didistill.train.errors import CheckpointError
from didistill.train.state import EngineState, init_state
from tests import dummy_method


@pytest.fixture(scope="module")
def replicated():
    return sharding.replicated(sharding.make_mesh())


def _state(replicated, dim=4, seed=0):
    """A wrapped dummy state: dicts, optax NamedTuples, a typed key, int32 counters."""
    config = dummy_method.load_config()
    config.dummy.dim = dim
    method = dummy_method.make_method(config)
    state = init_state(method.init(jax.random.key(seed)))
    state = state._replace(step=jnp.int32(7), nonfinite_total=jnp.int32(2))
    return jax.device_put(state, replicated)


def _abstract(state, replicated):
    return sharding.with_sharding(jax.eval_shape(lambda: state), replicated)


def _corrupt(directory, step):
    for path in glob.glob(os.path.join(directory, str(step), "state", "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 4:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def test_engine_state_round_trips_with_structure_dtypes_and_shardings(tmp_path, replicated):
    state = _state(replicated)
    with Checkpointer(str(tmp_path), keep=2) as ckpt:
        assert ckpt.save(7, state, {"window": {"sums": {"loss": 0.1}, "finite": 1, "steps": 1}})
    with Checkpointer(str(tmp_path), keep=2) as ckpt:
        restored = ckpt.restore_latest(_abstract(state, replicated))
    assert restored.step == 7
    assert restored.meta["window"]["sums"]["loss"] == 0.1 and restored.meta["step"] == 7
    assert isinstance(restored.state, EngineState)
    assert jax.tree.structure(restored.state) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.sharding == replicated
    assert jax.dtypes.issubdtype(restored.state.method_state["key"].dtype, jax.dtypes.prng_key)
    got, want = dummy_method.tree_arrays(restored.state), dummy_method.tree_arrays(state)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_keeps_the_newest_and_does_not_save_a_step_twice(tmp_path, replicated):
    state = _state(replicated)
    with Checkpointer(str(tmp_path), keep=2) as ckpt:
        for step in (1, 2, 3):
            assert ckpt.save(step, state, {})
        assert not ckpt.save(3, state, {})
        ckpt.wait()
        assert ckpt.steps() == [2, 3]


def test_corrupt_checkpoint_is_set_aside_and_the_previous_one_restored(
    tmp_path, replicated, caplog
):
    older, newer = _state(replicated, seed=1), _state(replicated, seed=2)
    with Checkpointer(str(tmp_path), keep=3) as ckpt:
        ckpt.save(1, older, {})
        ckpt.save(2, newer, {})
    _corrupt(str(tmp_path), 2)
    files_before = sorted(
        os.path.relpath(p, tmp_path / "2") for p in glob.glob(str(tmp_path / "2" / "**"))
    )

    logging.getLogger("didistill").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING), Checkpointer(str(tmp_path), keep=3) as ckpt:
            restored = ckpt.restore_latest(_abstract(newer, replicated))
            assert restored.step == 1
            assert ckpt.steps() == [1]
            assert ckpt.save(2, newer, {})  # the step can be saved again
    finally:
        logging.getLogger("didistill").removeHandler(caplog.handler)
    assert "checkpoint step 2" in caplog.text and "cannot be read" in caplog.text
    (aside,) = glob.glob(str(tmp_path / "corrupt_2_*"))
    files_after = sorted(os.path.relpath(p, aside) for p in glob.glob(os.path.join(aside, "**")))
    assert files_after == files_before
    got = dummy_method.tree_arrays(restored.state)
    jax.tree.map(np.testing.assert_array_equal, got, dummy_method.tree_arrays(older))


def test_checkpoint_of_another_config_is_an_error_and_left_alone(tmp_path, replicated):
    with Checkpointer(str(tmp_path), keep=2) as ckpt:
        ckpt.save(5, _state(replicated, dim=4), {})
    with Checkpointer(str(tmp_path), keep=2) as ckpt:
        with pytest.raises(CheckpointError, match=r"params/w' has shape \(4,\).*\(5,\) here"):
            ckpt.restore_latest(_abstract(_state(replicated, dim=5), replicated))
        assert ckpt.steps() == [5]
    assert sorted(os.listdir(tmp_path)) == ["5"]


def test_no_checkpoint_restores_none(tmp_path, replicated):
    with Checkpointer(str(tmp_path / "empty"), keep=1) as ckpt:
        assert ckpt.restore_latest(_abstract(_state(replicated), replicated)) is None
