"""VDOT's generator loss: DMD's score difference plus an optimal-transport direction.

VDOT ("Efficient Unified Video Creation via Optimal Transport Distillation"; code
hhhh1138/VDOT, commit 95d8ad6, `training/model/bi_dmd_gan.py`) distils a few-step video
generator by distribution matching (DMD) and adds a term that moves the generator's samples
so that the *fake score's* denoised predictions become, in the optimal-transport sense,
close to the *teacher's* at the same noisy input. With `x0` the generator's samples [B, ...],
`xt = x0 + sigma eps`, `D_phi`, `D_psi` the teacher's and fake score's denoisers at `xt`:

    OT_eps(X, Y)   = <P*, C>,  C_ij = ||x_i - y_j||^2,  P* the entropic plan (Sinkhorn, eps,
                     a fixed number of log-domain iterations, uniform marginals)
    g              = grad_{D_psi} OT_eps(feats(D_psi), feats(D_phi)),     [B, ...]
    u_i            = g_i / (||g_i|| + 1e-8)                               (per sample)
    L_ot           = ot_step * mean_i < sg(u_i), x0_i >                  (grad: ot_step u_i / B)
    L              = dmd_weight * L_dmd + ot_weight * L_ot   (+ gan_weight * L_gan, the engine's)

`L_dmd` is DMD's score-difference loss (`losses.f_distill_generator_loss` at reverse KL, the
engine's time weight); `L_ot` descends along `-u`: each sample moves, by a fixed step, in the
direction that would lower the OT distance of the fake score's prediction from the teacher's.
Gradients never flow through either network (both predictions are under stop-gradient).

The reference (line numbers at 95d8ad6): `sinkhorn_logdomain_cost` 259-289 (squared
Euclidean cost, uniform marginals, `f`/`g` log-domain updates, cost `sum(P C)`);
`ot_grad_against_fake` 318-345 (2x2 average pooling, then each frame's spatial positions are
the points, channels the coordinates; gradient w.r.t. the fake prediction; `debias=False`);
`_compute_ot_grad` 347-428 (eps 0.1, 60 iterations, p = 2, per-frame unit normalisation,
line 425); `compute_ot_loss` 430-500 (`0.5 * mse(x, sg(x - 0.1 u), sum)`: gradient `0.1 u`);
`generator_loss` 594-630 (`0.2 * dmd + 0.8 * ot` on even steps, GAN on odd steps). The
reference's per-GPU batch is 1 and DDP averages gradients over GPUs, hence our mean over
samples. Its GAN is a relativistic one, alternated with the DMD+OT update; here the engine's
non-saturating GAN term is added to every generator update (`config.distill.gan_weight`).
Its DMD term uses Self-Forcing's `t / 1000` weight (flow matching); ours keeps DMD's EDM weight.

`features` (`config.distill.ot_features`) picks the points that are transported:
- `'pixels'` (the reference): per sample, the positions of the `ot_downsample`-pooled image
  [h w, C]; B independent problems, vmapped;
- `'batch'`: the B samples, flattened, are the points of one problem (the toy's 2-D samples
  have no spatial axis: there 'pixels' would be one point per sample, whose OT gradient is
  just `2 (D_psi - D_phi)`, DMD's direction).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from didistill.distill.one_step import losses
from didistill.divergences import transport

sg = jax.lax.stop_gradient
OT_FEATURES = ("batch", "pixels")


def avg_pool(x, factor):
    """`factor` x `factor` average pooling of [B, H, W, C] (H, W divisible by `factor`)."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def ot_cost(fake, teacher, epsilon, iterations, features="batch", downsample=1):
    """The transported cost `OT_eps(feats(fake), feats(teacher))`, summed over the problems.

    `fake`, `teacher` [B, ...]; 'batch': one problem between the B flattened samples;
    'pixels': B problems between each sample's pooled positions ([B, H, W, C] inputs).
    Sinkhorn by ott-jax (`divergences.transport.sinkhorn`) with exactly `iterations`
    log-domain iterations, differentiated by unrolling them (as the reference's autograd
    does). The cost matrix is built here: ott's `PointCloud` gave a zero gradient in a
    coordinate that is exactly 0 for every point (measured, ott-jax as pinned)."""

    def cost(x, y):  # [N, D], [M, D]; C_ij = ||x_i - y_j||^2 (the reference's cdist ** 2)
        c = jnp.sum(x**2, 1)[:, None] + jnp.sum(y**2, 1)[None, :] - 2.0 * x @ y.T
        return transport.sinkhorn(
            c, epsilon=epsilon, num_iterations=iterations, differentiation="unrolled"
        ).transport_cost

    if features == "batch":
        b = fake.shape[0]
        return cost(fake.reshape(b, -1), teacher.reshape(b, -1))
    if features == "pixels":
        if fake.ndim != 4:
            raise ValueError(
                "config.distill.ot_features='pixels' needs images [B, H, W, C]; use 'batch'"
            )
        fx, ty = avg_pool(fake, downsample), avg_pool(teacher, downsample)
        b, c = fx.shape[0], fx.shape[-1]
        return jnp.sum(jax.vmap(cost)(fx.reshape(b, -1, c), ty.reshape(b, -1, c)))
    raise ValueError(f"config.distill.ot_features={features!r} is not one of {OT_FEATURES}")


def ot_direction(fake, teacher, epsilon, iterations, features="batch", downsample=1):
    """`u` [B, ...]: the gradient of `ot_cost` w.r.t. `fake`, each sample scaled to unit norm
    (`g_i / (||g_i|| + 1e-8)`, NaN -> 0), under stop-gradient."""
    grad = jax.grad(ot_cost)(
        sg(fake).astype(jnp.float32),
        sg(teacher).astype(jnp.float32),
        epsilon,
        iterations,
        features,
        downsample,
    )
    norm = jnp.sqrt(jnp.sum(grad**2, axis=tuple(range(1, grad.ndim)), keepdims=True))
    return sg(jnp.nan_to_num(grad / (norm + 1e-8)).astype(fake.dtype))


def ot_loss(x0, d_teacher, d_fake, ot_step, epsilon, iterations, features, downsample):
    """`ot_step * mean_i <sg(u_i), x0_i>`: the generator's OT term (gradient `ot_step u_i / B`)."""
    u = ot_direction(d_fake, d_teacher, epsilon, iterations, features, downsample)
    return ot_step * jnp.mean(jnp.sum(u * x0, axis=tuple(range(1, x0.ndim))))


def vdot_generator_loss(x0, d_teacher, d_fake, log_r, divergence, cfg):
    """`dmd_weight * L_dmd + ot_weight * L_ot` (see the module docstring); `cfg` is
    `config.distill` (keys `dmd_weight`, `ot_weight`, `ot_step`, `ot_epsilon`,
    `ot_iterations`, `ot_features`, `ot_downsample`, plus DMD's `time_weight`,
    `normalize_weights`)."""
    dmd = losses.f_distill_generator_loss(
        x0, d_teacher, d_fake, log_r, divergence, cfg.normalize_weights, cfg.time_weight
    )
    ot = ot_loss(
        x0,
        d_teacher,
        d_fake,
        cfg.ot_step,
        cfg.ot_epsilon,
        cfg.ot_iterations,
        cfg.ot_features,
        cfg.ot_downsample,
    )
    return cfg.dmd_weight * dmd + cfg.ot_weight * ot


__all__ = [
    "OT_FEATURES",
    "avg_pool",
    "ot_cost",
    "ot_direction",
    "ot_loss",
    "vdot_generator_loss",
]
