"""`OneStepParts`: what one-step distillation needs from a data domain (toy, images).

`one_step.make_method` is written once against this bundle; `one_step_toy.build` and
`one_step_images.build` fill it in. `cond` is the conditioning of a batch (class labels [B]) or
None for unconditional models; every network function takes it and may ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class OneStepParts(NamedTuple):
    sigma_data: float
    batch_size: int  # global batch
    init_params: Callable  # key -> (generator, fake_score, discriminator) params
    # (generator params, key, n) -> (x0 [n, ...], cond [n] or None): the student's sample with
    # all its `config.generator.num_steps` steps (`one_step.few_step.sample`)
    generate: Callable
    denoise: Callable  # (params, x, sigma, cond) -> D(x; sigma) with the shared architecture
    teacher_denoise: Callable  # (x, sigma, cond) -> D_phi(x; sigma), frozen
    # (params, x, sigma, cond, fake_score params) -> logit [B] (or [B, heads]) estimating
    # log p_t - log q_t; the fake score's params are used when it shares its encoder (SiDA)
    disc_logit: Callable
    exact_student_denoiser: Callable | None  # (affine generator params, x, sigma) -> D_q
    exact_log_ratio: Callable | None  # (affine generator params, x, sigma) -> log p_t - log q_t
    batches: Callable  # start_step -> iterator of {'x': [B, critic_steps, ...], 'label'?: [B, k]}
    evaluate: Callable  # (generator EMA params, key, workdir) -> flat dict of metrics
    # (generator EMA params, key, workdir, step) -> metrics for metrics.jsonl, or None
    periodic_evaluate: Callable | None = None
    # few-step students (`one_step.few_step`): one generator step and the latent of a sample
    generator_step: Callable | None = None  # (params, x, sigma [B], cond) -> x0
    latent: Callable | None = None  # (key, n) -> (z [n, ...] ~ N(0, I), cond [n] or None)


__all__ = ["OneStepParts"]
