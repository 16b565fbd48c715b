"""XLA:CPU setting applied when didistill is imported: no YNNPACK library fusions.

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

The flag is appended to `XLA_FLAGS` only when the user has not chosen a YNN setting, and it
takes effect only if no JAX backend has started yet (XLA reads the flags once, when it creates
the CPU client): import didistill before running any JAX computation, or put the flag in
`XLA_FLAGS` yourself. `ynn_fusions_active()` tells whether it did (JAX has no public way to
ask whether a backend has started, so it compiles a small matmul and reads the HLO). GPUs and
TPUs ignore the flag.
"""

from __future__ import annotations

import os

import jax  # importing JAX does not read XLA_FLAGS; its first computation does
import jax.numpy as jnp

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def disable_ynn_fusions(environ=os.environ) -> bool:
    """Appends `YNN_FLAG=` to XLA_FLAGS unless it is already set; True if it was appended."""
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    return True


def ynn_fusions_active() -> bool:
    """True if XLA:CPU still emits YNNPACK fusions in this process (starts the JAX backend)."""
    x = jnp.ones((64, 64), jnp.float32)
    return "__ynn_fusion" in jax.jit(lambda a: jnp.sum(a @ a)).lower(x).compile().as_text()
