"""The XLA:CPU workaround applied on import: no YNNPACK fusions (see didistill/xla_cpu.py)."""

import os
import subprocess
import sys

from didistill import xla_cpu

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


def _run(first: str, xla_flags: str = "") -> str:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", WRONG_SUM.format(first=first)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return out.stdout.split("\n")[-2]


def test_importing_didistill_turns_ynn_fusions_off_and_fixes_a_known_wrong_sum():
    assert _run("didistill") == "True False"


def test_without_the_workaround_the_pinned_jaxlib_gets_the_sum_wrong():
    """The control: proves the check above can fail (update it when jaxlib is bumped)."""
    assert _run("numpy") == "False True"


def test_a_users_own_setting_is_kept():
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {xla_cpu.YNN_FLAG}=dot"}
    assert not xla_cpu.disable_ynn_fusions(env)
    assert env["XLA_FLAGS"].endswith("=dot")


def test_importing_didistill_after_jax_started_is_too_late_and_detected():
    code = (
        "import jax.numpy as jnp; float(jnp.ones(()))\n"  # the backend starts here
        "from didistill import xla_cpu; print(xla_cpu.ynn_fusions_active())"
    )
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    assert out.stdout.split() == ["True"]


def test_this_test_process_compiles_without_ynn_fusions():
    assert f"{xla_cpu.YNN_FLAG}=" in os.environ["XLA_FLAGS"]
    assert not xla_cpu.ynn_fusions_active()
