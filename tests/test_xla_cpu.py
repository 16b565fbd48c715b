"""The XLA:CPU workaround applied on import: no YNNPACK fusions (see didistill/xla_cpu.py)."""

import os
import subprocess
import sys

import pytest

from didistill import xla_cpu

AFFECTED = xla_cpu.jaxlib_version() in xla_cpu.AFFECTED_JAXLIB
needs_affected_jaxlib = pytest.mark.skipif(
    not AFFECTED, reason=f"jaxlib {xla_cpu.jaxlib_version()} is not in xla_cpu.AFFECTED_JAXLIB"
)

# jax-ml/jax#39103: sum((I @ row)^2) over a vmapped batch of 32,769 rows is wrong under jit on
# jaxlib 0.10.2 with YNNPACK fusions (measured here: 1,065,369,600 instead of 32,768^2).
WRONG_SUM = """
import {first}
import jax, jax.numpy as jnp
i = jnp.arange(32_769, dtype=jnp.float32)
x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
f = jax.jit(lambda x: jax.vmap(lambda row: jnp.sum((jnp.eye(3) @ row) ** 2))(x))
print(float(f(x)[-1]) == 32_768.0**2, "__ynn_fusion" in f.lower(x).compile().as_text())
"""


def _run(first: str, xla_flags: str = "", **env_vars) -> str:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", **env_vars)
    if xla_cpu.SWITCH not in env_vars:
        env.pop(xla_cpu.SWITCH, None)
    out = subprocess.run(
        [sys.executable, "-c", WRONG_SUM.format(first=first)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return out.stdout.split("\n")[-2]


@needs_affected_jaxlib
def test_importing_didistill_turns_ynn_fusions_off_and_fixes_a_known_wrong_sum():
    assert _run("didistill") == "True False"


@needs_affected_jaxlib
def test_without_the_workaround_the_pinned_jaxlib_gets_the_sum_wrong():
    """The control: proves the check above can fail (update it when jaxlib is bumped)."""
    assert _run("numpy") == "False True"


def test_a_users_own_setting_is_kept():
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {xla_cpu.YNN_FLAG}=dot"}
    assert not xla_cpu.disable_ynn_fusions(env)
    assert env["XLA_FLAGS"].endswith("=dot")


@needs_affected_jaxlib
def test_importing_didistill_after_jax_started_is_too_late_and_detected():
    code = (
        "import jax.numpy as jnp; float(jnp.ones(()))\n"  # the backend starts here
        "from didistill import xla_cpu; print(xla_cpu.ynn_fusions_active())"
    )
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    env.pop(xla_cpu.SWITCH, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    assert out.stdout.split() == ["True"]


@needs_affected_jaxlib
def test_this_test_process_compiles_without_ynn_fusions():
    if not xla_cpu.should_disable_ynn_fusions({})[0] or os.environ.get(xla_cpu.SWITCH):
        pytest.skip("this machine's environment does not call for the flag")
    assert f"{xla_cpu.YNN_FLAG}=" in os.environ["XLA_FLAGS"]
    assert not xla_cpu.ynn_fusions_active()


@needs_affected_jaxlib
def test_the_switch_turns_the_workaround_off():
    assert _run("didistill", DIDISTILL_XLA_CPU_FLAGS="0") == "False True"


V = xla_cpu.AFFECTED_JAXLIB[0]


@pytest.mark.parametrize(
    "environ,version,plugins,expected",
    [
        ({}, V, [], True),  # the CPU-only machine of the lock
        ({"JAX_PLATFORMS": "cpu"}, V, ["xla_cuda12"], True),  # CPU asked for explicitly
        ({"JAX_PLATFORMS": " CPU "}, V, [], True),
        ({}, V, ["xla_cuda12"], False),  # a GPU machine: its plugin also parses XLA_FLAGS
        ({}, V, ["libtpu"], False),  # a TPU VM
        ({"JAX_PLATFORMS": "cuda"}, V, [], False),
        ({"JAX_PLATFORMS": "tpu,cpu"}, V, [], False),
        ({}, "0.7.2", [], False),  # Colab's jaxlib: no such flag, XLA would abort
        ({}, "0.10.1", [], False),  # no defect there
        ({}, "0.11.0", [], False),  # unknown: added to AFFECTED_JAXLIB only after checking
        ({}, None, [], False),  # (jaxlib_version() of a jaxlib without metadata)
        ({"DIDISTILL_XLA_CPU_FLAGS": "0"}, V, [], False),
        ({"DIDISTILL_XLA_CPU_FLAGS": "off"}, V, [], False),
        ({"DIDISTILL_XLA_CPU_FLAGS": "1"}, V, [], True),
        ({"XLA_FLAGS": f"{xla_cpu.YNN_FLAG}=dot"}, V, [], False),  # the user's own choice
    ],
)
def test_when_the_flag_is_set(environ, version, plugins, expected):
    env = dict(environ)
    flags_before = env.get("XLA_FLAGS")
    apply, reason = xla_cpu.should_disable_ynn_fusions(env, version or "none", plugins)
    assert apply is expected, reason
    assert xla_cpu.disable_ynn_fusions(env, version or "none", plugins) is expected
    if expected:
        assert env["XLA_FLAGS"].endswith(f"{xla_cpu.YNN_FLAG}=")
    else:
        assert env.get("XLA_FLAGS") == flags_before


def test_plugin_detection_finds_a_jax_plugins_module(tmp_path, monkeypatch):
    """A fake jax-cuda12-pjrt layout (namespace package `jax_plugins`) and a fake libtpu."""
    (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
    (tmp_path / "libtpu").mkdir()
    (tmp_path / "libtpu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"xla_cuda12", "libtpu"} <= set(xla_cpu.accelerator_plugins())
    assert not xla_cpu.should_disable_ynn_fusions({}, V)[0]


def test_an_unaffected_jaxlib_starts_with_xla_flags_untouched():
    """Run in every environment: `import didistill` leaves XLA_FLAGS alone unless it must."""
    code = "import os, didistill; print(repr(os.environ.get('XLA_FLAGS')))"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop(xla_cpu.SWITCH, None)
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    expected = "--xla_force_host_platform_device_count=2"
    if AFFECTED:
        expected += f" {xla_cpu.YNN_FLAG}="
    assert out.stdout.strip() == repr(expected)
