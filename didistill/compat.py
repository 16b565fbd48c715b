"""JAX names that moved within the versions setup.cfg allows (jax 0.7.2 to 0.10.x).

`jax.enable_x64` is public from jax 0.8.0; jax 0.7.2 (Colab's) has it as
`jax.experimental.enable_x64`. Library code uses `compat.enable_x64`.
"""

import jax

if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:  # jax < 0.8
    from jax.experimental import enable_x64  # noqa: F401

__all__ = ["enable_x64"]
