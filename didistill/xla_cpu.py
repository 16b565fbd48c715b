"""XLA:CPU setting applied when didistill is imported: no YNNPACK library fusions (jaxlib 0.10.2).

jaxlib 0.10.2 (the version this project pins) offloads dots, reductions and elementwise
chains on the CPU to YNNPACK (`__ynn_fusion` in the compiled HLO). Those fusions have known
defects in that release (0.10.1 was correct): wrong sums after a vmapped matrix-vector product
(jax-ml/jax#39103) and faults on Eigen worker threads for some reductions (jax-ml/jax#39257,
#40412). Here a freshly initialised DiT, whose YNN-fused zero-initialised output layer turns
any non-finite hidden value into NaN logits, gave a NaN held-out loss once in a full CI run and
never in 30 isolated reruns; YNNPACK is the likely cause, not a proven one.

`--xla_cpu_experimental_ynn_fusion_type=` (an empty list) turns every YNNPACK fusion off, so
XLA uses its own CPU emitters and Eigen. On this project's 2-core CPU that was also faster:
`benchmarks.run --only throughput --repeats 5`, YNN on (`=-invalid`, jaxlib's default list)
and off, interleaved twice: toy DMD2 23.3 / 26.1 -> 36.0 / 37.1 steps/s, EDM teacher training
2.59 / 2.96 -> 3.49 / 4.81, MDLM teacher 1.24 / 1.42 -> 1.38 / 1.51.

When the flag is set (`should_disable_ynn_fusions` decides, from the environment only: no
backend is started):

1. never if `DIDISTILL_XLA_CPU_FLAGS=0` (also `off`, `false`, `no`): the switch for users;
2. never if the user has chosen a YNN setting in `XLA_FLAGS` (it is kept as it is);
3. only for the jaxlib versions in `AFFECTED_JAXLIB` (the installed distribution's version, read
   from its metadata): XLA aborts at start-up on a flag it does not know, and older jaxlibs (the
   0.7 of Colab, for one) have no such flag, newer ones may rename it. A new jaxlib is added to
   the list after checking it with tests/test_xla_cpu.py (its control test fails where the
   defect is gone);
4. only when JAX will run on the CPU: if `JAX_PLATFORMS` is set, only when it names the CPU
   alone (`cpu`); if it is not set, only when no accelerator plugin is installed (no
   `jax_plugins` module or entry point, such as jax-cuda12-pjrt or jax-rocm's, and no libtpu).
   On a GPU or TPU machine XLA_FLAGS is also parsed by the accelerator's plugin, which may not
   know an XLA:CPU flag, so it is left alone there.

The flag takes effect only if no JAX backend has started yet (XLA reads the flags once, when
it creates the CPU client): import didistill before running any JAX computation, or put the
flag in `XLA_FLAGS` yourself. `ynn_fusions_active()` tells whether it did (JAX has no public
way to ask whether a backend has started, so it compiles a small matmul and reads the HLO).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
from collections.abc import Iterable, Mapping

import jax  # importing JAX does not read XLA_FLAGS; its first computation does
import jax.numpy as jnp

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
SWITCH = "DIDISTILL_XLA_CPU_FLAGS"  # "0": never touch XLA_FLAGS
AFFECTED_JAXLIB = ("0.10.2",)  # jaxlib versions with the defect and the flag (see above)
_OFF = ("0", "off", "false", "no")


def jaxlib_version() -> str | None:
    """The installed jaxlib's version (from its metadata; jaxlib is not imported)."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator_plugins() -> list[str]:
    """Installed JAX accelerator plugins, without importing them: `jax_plugins.*` modules,
    `jax_plugins` entry points, and libtpu."""
    found = set()
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        found.update(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
    try:
        found.update(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
    except Exception:  # a broken distribution's metadata must not stop the import
        pass
    if importlib.util.find_spec("libtpu") is not None:
        found.add("libtpu")
    return sorted(found)


def should_disable_ynn_fusions(
    environ: Mapping[str, str] = os.environ,
    version: str | None = None,
    plugins: Iterable[str] | None = None,
) -> tuple[bool, str]:
    """(whether to set the flag, why): the rule of this module's docstring."""
    if environ.get(SWITCH, "").strip().lower() in _OFF:
        return False, f"{SWITCH}={environ[SWITCH]}"
    if YNN_FLAG in environ.get("XLA_FLAGS", ""):
        return False, "XLA_FLAGS already holds a YNN setting"
    version = jaxlib_version() if version is None else version
    if version not in AFFECTED_JAXLIB:
        return False, f"jaxlib {version} is not one of {AFFECTED_JAXLIB}"
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        names = {p.strip().lower() for p in platforms.split(",") if p.strip()}
        if names != {"cpu"}:
            return False, f"JAX_PLATFORMS={platforms} is not the CPU alone"
        return True, f"jaxlib {version}, JAX_PLATFORMS=cpu"
    plugins = accelerator_plugins() if plugins is None else list(plugins)
    if plugins:
        return False, f"accelerator plugins installed: {', '.join(plugins)}"
    return True, f"jaxlib {version}, no accelerator plugin installed"


def disable_ynn_fusions(environ=os.environ, version=None, plugins=None) -> bool:
    """Appends `YNN_FLAG=` to XLA_FLAGS if `should_disable_ynn_fusions`; True if appended."""
    apply, _ = should_disable_ynn_fusions(environ, version, plugins)
    if apply:
        environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {YNN_FLAG}=".strip()
    return apply


def ynn_fusions_active() -> bool:
    """True if XLA:CPU still emits YNNPACK fusions in this process (starts the JAX backend)."""
    x = jnp.ones((64, 64), jnp.float32)
    return "__ynn_fusion" in jax.jit(lambda a: jnp.sum(a @ a)).lower(x).compile().as_text()
