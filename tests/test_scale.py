"""The mesh from config, FSDP state sharding and sharded checkpoints, on 4 simulated devices.

The checks that need 4 devices run once, in one subprocess (`python -m tests.test_scale` with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, as in `test_sharding.py`), and report a
JSON dict; each test below asserts on its part of it. The mesh's size rules are also checked
in-process, on the pure `sharding.mesh_shape`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from didistill.train import sharding
from didistill.train.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4


def test_mesh_shape_from_config_sizes():
    assert sharding.mesh_shape(-1, 1, 8) == (8, 1)
    assert sharding.mesh_shape(-1, 2, 4) == (2, 2)
    assert sharding.mesh_shape(2, 4, 8) == (2, 4)
    with pytest.raises(ConfigError, match=r"config.mesh.model=3 .*divide the 4 devices.*1, 2, 4"):
        sharding.mesh_shape(-1, 3, 4)
    with pytest.raises(ConfigError, match=r"config.mesh.data=3 .*model=2.*-1 .* or 2\."):
        sharding.mesh_shape(3, 2, 4)
    with pytest.raises(ConfigError, match=r"config.mesh.model=0"):
        sharding.mesh_shape(-1, 0, 4)


def test_leaf_sharding_rule():
    data = AbstractMesh((8,), ("data",), axis_types=(AxisType.Auto,))
    spec = lambda shape, mesh=data, axes=("data",): sharding.leaf_sharding(shape, mesh, axes).spec  # noqa: E731
    assert spec((3, 3, 16, 32)) == P(None, None, None, "data")  # the largest dimension
    assert spec((3, 3, 32, 32)) == P(None, None, None, "data")  # the last among ties
    assert spec((50258, 768)) == P(None, "data")  # the largest that divides
    assert spec((10,)) == P() and spec(()) == P()  # nothing divides: replicated
    assert spec((16, 8), axes=()) == P()  # no FSDP, no model axis
    both = AbstractMesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    assert sharding.parameter_axes(both, fsdp=True) == ("data", "model")
    assert sharding.parameter_axes(both, fsdp=False) == ("model",)
    assert spec((6, 4), both, ("data", "model")) == P(None, ("data", "model"))
    assert spec((6,), both, ("data", "model")) == P("data")  # 6 splits over one axis only


# ---- run in the 4-device subprocess -------------------------------------------------------


def _load_config(path: str, arg: str):
    """`get_config(arg)` of the shipped config `configs/NAME.py` (`didistill.configs.NAME`)."""
    name = os.path.basename(path).removesuffix(".py")
    return importlib.import_module(f"didistill.configs.{name}").get_config(arg)


def _spec(x) -> list:
    """A sharding's spec as JSON: None, an axis name, or a list of axis names per dimension."""
    return [list(p) if isinstance(p, tuple) else p for p in x.sharding.spec]


def _child_mesh_from_config():
    import jax

    from didistill.train import loop

    config = _load_config("configs/synthetic_mdlm.py", "markov_tiny,smoke")
    config.mesh.model = 2
    mesh = sharding.mesh_from_config(config.mesh)
    out = {"axes": list(mesh.axis_names), "shape": dict(mesh.shape)}
    out["check"] = list(loop.check_config(config))
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    rows = sharding.check_batch(8, mesh)
    batch = sharding.global_batch({"x": x}, sharding.batch_sharding(mesh), rows)["x"]
    out["batch_spec"] = _spec(batch)
    out["batch_shards"] = sorted({s.data.shape[0] for s in batch.addressable_shards})
    errors = []
    config.train.batch_size = 6  # 3 rows per data index with model=2, not with model=1
    for data, model in ((-1, 2), (3, 2), (-1, 3), (-1, 1)):
        config.mesh.update(data=data, model=model)
        try:
            loop.check_config(config)
            errors.append(None)
        except ConfigError as err:
            errors.append(str(err))
    out["errors"] = errors
    out["device_count"] = jax.device_count()
    return out


def _state_split(config_path: str, arg: str):
    """Specs of the abstract FSDP state of a config's method (no allocation)."""
    import jax

    from didistill.distill import get_method
    from didistill.train import loop

    config = _load_config(config_path, arg)
    config.mesh.fsdp = True
    method = get_method(config)
    mesh = sharding.mesh_from_config(config.mesh)
    abstract, _ = loop.state_shardings(method, config.seed, mesh, fsdp=True)
    total = split = 0
    wrong = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        size = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        total += size
        spec, name = _spec(leaf), jax.tree_util.keystr(path)
        largest = max((n for n in leaf.shape if n % NUM_DEVICES == 0), default=0)
        if "data" in spec:
            split += size
            dim = spec.index("data")
            shard = leaf.sharding.shard_shape(leaf.shape)
            if leaf.shape[dim] != largest or shard[dim] * NUM_DEVICES != leaf.shape[dim]:
                wrong.append(f"{name} {leaf.shape} {spec} shard {shard}")
        elif largest:
            wrong.append(f"{name} {leaf.shape} replicated")
    kernels = [_spec(x) for x in jax.tree.leaves(abstract.method_state.params) if x.ndim >= 2]
    return {"split_fraction": split / total, "wrong": wrong, "kernel_specs": kernels}


def _child_fsdp_unet():
    return _state_split("configs/digits_teacher.py", "smoke")


def _child_fsdp_dit():
    return _state_split("configs/synthetic_mdlm.py", "markov_tiny,smoke")


def _child_fsdp_training():
    """The DiT MDLM teacher, 3 engine steps, replicated and FSDP: losses and final params."""
    import jax

    from didistill.distill import get_method
    from didistill.train import loop

    out = {}
    for name, fsdp in (("replicated", False), ("fsdp", True)):
        config = _load_config("configs/synthetic_mdlm.py", "markov_tiny,smoke")
        config.train.update(num_steps=3, log_every=1, checkpoint_every=0, batch_size=8)
        config.mesh.fsdp = fsdp
        method = get_method(config)._replace(evaluate=lambda state, key, workdir: {})
        workdir = tempfile.mkdtemp()
        result = loop.train(method, config, workdir)
        with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
            out[name] = {"loss": [json.loads(line)["loss"] for line in f]}
        params = result["state"].params
        out[name]["specs"] = [_spec(x) for x in jax.tree.leaves(params)]
        out[name]["shards"] = [
            list(x.addressable_shards[0].data.shape) for x in jax.tree.leaves(params)
        ]
        out[name]["params"] = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)]
    return out


def _child_sharded_resume():
    """The dummy method with FSDP over ('data', 'model'): preempted + resumed == uninterrupted."""
    import jax

    from didistill.train import loop, writers
    from didistill.train.checkpoint import Checkpointer
    from tests import dummy_method

    def config(**dummy):
        c = dummy_method.load_config()
        c.dummy.dim = 16  # w [16]: split over the 4 devices, like its Adam moments and EMA
        c.mesh.update(data=-1, model=2, fsdp=True)
        c.dummy.update(dummy)
        c.fingerprint_ignore = ("dummy.sigterm_at_step",)  # the preemption is not the config
        return c

    def run(workdir, c):
        return loop.train(dummy_method.make_method(c), c, workdir)

    metrics = writers.comparable_metrics  # without the timing keys

    ref_dir, run_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    ref = run(ref_dir, config())
    first = run(run_dir, config(sigterm_at_step=6))
    second = run(run_dir, config())
    ref_arrays = dummy_method.tree_arrays(ref["state"])
    resumed_arrays = dummy_method.tree_arrays(second["state"])
    same = jax.tree.map(np.array_equal, ref_arrays, resumed_arrays)

    c = config()
    method = dummy_method.make_method(c)
    mesh = sharding.mesh_from_config(c.mesh)
    abstract, _ = loop.state_shardings(method, c.seed, mesh, fsdp=True)
    with Checkpointer(os.path.join(run_dir, loop.CHECKPOINT_DIR), 2) as ckpt:
        restored = ckpt.restore(12, abstract).state.method_state
    _, replicated_state = loop.load_checkpoint(method, c, run_dir)
    return {
        "first": [first["step"], first["preempted"]],
        "metrics_equal": metrics(ref_dir) == metrics(run_dir),
        "state_equal": all(jax.tree.leaves(same)),
        "eval_equal": second["eval"] == ref["eval"],
        "w_spec": _spec(ref["state"]["params"]["w"]),
        "restored_specs": {
            "w": _spec(restored["params"]["w"]),
            "adam_mu_w": _spec(restored["opt_state"][0].mu["w"]),
            "ema_w": _spec(restored["ema_params"]["w"]),
            "b": _spec(restored["params"]["b"]),
        },
        "restored_equal": bool(
            np.array_equal(np.asarray(restored["params"]["w"]), ref_arrays["params"]["w"])
        ),
        "load_checkpoint_replicated": all(
            x.sharding.is_fully_replicated for x in jax.tree.leaves(replicated_state)
        ),
        "load_checkpoint_equal": bool(
            np.array_equal(np.asarray(replicated_state["params"]["w"]), ref_arrays["params"]["w"])
        ),
    }


_CHILD_CHECKS = (
    _child_mesh_from_config,
    _child_fsdp_unet,
    _child_fsdp_dit,
    _child_fsdp_training,
    _child_sharded_resume,
)


def _child_main() -> None:
    results = {}
    for check in _CHILD_CHECKS:
        name = check.__name__.removeprefix("_child_")
        start = time.perf_counter()
        try:
            results[name] = check()
        except Exception:
            results[name] = {"error": traceback.format_exc()[-4000:]}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print("RESULTS " + json.dumps(results))


# ---- the tests, on the subprocess's report ------------------------------------------------


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_scale"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS ") :])


def _part(results, name):
    part = results[name]
    assert "error" not in part, part.get("error")
    return part


def test_mesh_from_config_data_minus_one_model_two(four_devices):
    out = _part(four_devices, "mesh_from_config")
    assert out["device_count"] == NUM_DEVICES
    assert out["axes"] == ["data", "model"] and out["shape"] == {"data": 2, "model": 2}
    assert out["check"] == [2, 2, False]
    assert out["batch_spec"] == ["data"] and out["batch_shards"] == [4]  # 8 rows / 2 data
    ok, bad_data, bad_model, batch_on_four = out["errors"]
    assert ok is None  # batch 6 splits over data=2
    assert "config.mesh.data=3 is invalid" in bad_data and "or 2." in bad_data
    assert "config.mesh.model=3 is invalid" in bad_model and "1, 2, 4" in bad_model
    assert "batch_size=6 does not divide by the 4 devices on the data axis" in batch_on_four


@pytest.mark.parametrize("name", ["fsdp_unet", "fsdp_dit"])
def test_fsdp_splits_the_state_along_the_largest_dimension(four_devices, name):
    out = _part(four_devices, name)
    assert out["wrong"] == []
    assert out["split_fraction"] > 0.95  # only leaves like a bias of 3 or 10 stay replicated
    assert all("data" in spec for spec in out["kernel_specs"] if spec)


def test_fsdp_training_matches_replicated(four_devices):
    out = _part(four_devices, "fsdp_training")
    rep, fsdp = out["replicated"], out["fsdp"]
    assert all(spec == [] or set(spec) == {None} for spec in rep["specs"])
    split = [spec for spec in fsdp["specs"] if "data" in spec]
    assert len(split) >= len(fsdp["specs"]) // 2
    for spec, rep_shard, fsdp_shard in zip(
        fsdp["specs"], rep["shards"], fsdp["shards"], strict=True
    ):
        if "data" in spec:
            dim = spec.index("data")
            assert fsdp_shard[dim] * NUM_DEVICES == rep_shard[dim]
    assert len(rep["loss"]) == 3
    np.testing.assert_allclose(fsdp["loss"], rep["loss"], rtol=1e-5)
    # Adam divides by sqrt(v): rounding differences of near-zero gradients move a parameter by
    # a small fraction of one step (lr 3e-3), so compare to 1e-5 absolute.
    for a, b in zip(rep["params"], fsdp["params"], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_resume_is_bit_identical(four_devices):
    out = _part(four_devices, "sharded_resume")
    assert out["first"] == [7, True]
    assert out["metrics_equal"] and out["state_equal"] and out["eval_equal"]
    split = [["data", "model"]]
    assert out["w_spec"] == split
    assert out["restored_specs"] == {"w": split, "adam_mu_w": split, "ema_w": split, "b": []}
    assert out["restored_equal"]
    assert out["load_checkpoint_replicated"] and out["load_checkpoint_equal"]


if __name__ == "__main__":
    _child_main()
