"""didistill: divergence-based distillation in JAX (see README.md)."""

from didistill import xla_cpu

xla_cpu.disable_ynn_fusions()
