"""The mesh, the shardings and global batches; 4 simulated CPU devices in a subprocess."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from didistill.train import sharding
from didistill.train.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_spans_all_devices_on_the_data_axis():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == jax.device_count()
    assert sharding.make_mesh(jax.device_count()).shape == mesh.shape
    with pytest.raises(ConfigError, match="config.mesh.data=.*Valid choices: -1"):
        sharding.make_mesh(jax.device_count() + 1)


def test_global_batch_checks_rows_and_shards_the_leading_axis():
    mesh = sharding.make_mesh()
    rows = jax.device_count() * 2
    batch = {"x": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)}
    out = sharding.global_batch(batch, sharding.batch_sharding(mesh), rows)
    assert out["x"].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    with pytest.raises(ValueError, match=r"\['x'\] with shape \(5, 3\).*leading axis of 4 rows"):
        sharding.global_batch({"x": np.zeros((5, 3))}, sharding.batch_sharding(mesh), 4)


_FOUR_DEVICES = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from didistill.train import sharding
    from didistill.train.errors import ConfigError

    assert jax.device_count() == 4
    mesh = sharding.make_mesh()
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    batch = sharding.global_batch({"x": x}, data, sharding.check_batch(8, mesh))["x"]
    assert [s.data.shape for s in batch.addressable_shards] == [(2, 3)] * 4
    w = jax.device_put(jnp.ones((3,)), rep)
    assert all(s.data.shape == (3,) for s in w.addressable_shards)

    def step(w, x):
        loss, grad = jax.value_and_grad(lambda w: jnp.mean((x @ w) ** 2))(w)
        return w - 0.1 * grad, loss

    new_w, loss = jax.jit(step, out_shardings=rep)(w, batch)
    assert new_w.sharding == rep and len(new_w.addressable_shards) == 4
    ref_w, ref_loss = step(np.ones(3, np.float32), x)
    np.testing.assert_allclose(np.asarray(new_w), ref_w, rtol=1e-6)
    try:
        sharding.check_batch(6, mesh)
    except ConfigError as err:
        assert "does not divide by the 4 devices" in str(err), err
    else:
        raise AssertionError("batch 6 on 4 devices was accepted")
    print("OK")
    """
)


def test_four_simulated_devices_shard_the_batch_and_replicate_the_state():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
