"""Parity with VDOT's reference code (a NumPy transcription), hhhh1138/VDOT @95d8ad60697213,
training/model/bi_dmd_gan.py:

- `sinkhorn_logdomain_cost` 259-289: squared Euclidean cost, uniform marginals, log-domain
  updates `f = log a - lse(-C/eps + g)`, `g = log b - lse(-C^T/eps + f)`, cost `sum(P C)`;
- `sinkhorn_divergence` 292-314 with `debias=False` (the call of `ot_grad_against_fake`):
  the sum over frames of that cost between each frame's [H W, C] positions;
- `ot_grad_against_fake` 318-345: 2x2 average pooling first, gradient w.r.t. the fake;
- `_compute_ot_grad` 419-426: eps 0.1, 60 iterations, p = 2, each frame's gradient divided by
  its norm + 1e-8;
- `compute_ot_loss` 494-499 and `generator_loss` 630: `0.5 * mse(x, sg(x - 0.1 u), sum)`,
  weighted 0.8, next to 0.2 times DMD's `0.5 * mse(x, sg(x - grad), mean)`.
The reference's gradient (autograd through the unrolled loop) is checked by central finite
differences of the transcription, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from didistill.distill.one_step import vdot

RNG = np.random.default_rng(3)


def _ref_cost(x, y, eps=0.1, iters=60):  # sinkhorn_logdomain_cost, 259-289
    n, m = len(x), len(y)
    c = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    k_log = -c / eps
    f, g = np.zeros(n), np.zeros(m)
    loga, logb = np.log(np.full(n, 1 / n) + 1e-12), np.log(np.full(m, 1 / m) + 1e-12)
    for _ in range(iters):
        f = loga - logsumexp(k_log + g[None, :], axis=1)
        g = logb - logsumexp(k_log.T + f[None, :], axis=1)
    return float(np.sum(np.exp(f[:, None] + k_log + g[None, :]) * c))


def _ref_pixels_cost(fake, real, eps, iters):  # [B, C, H, W]: 292-314 after the 2x2 pool
    b, c, h, w = fake.shape
    pool = lambda v: v.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))  # noqa: E731
    xs = pool(fake).reshape(b, c, -1).transpose(0, 2, 1)
    ys = pool(real).reshape(b, c, -1).transpose(0, 2, 1)
    return sum(_ref_cost(xs[i], ys[i], eps, iters) for i in range(b))


def _fd_grad(fn, x, h=1e-5):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        grad[idx] = (fn(x + e) - fn(x - e)) / (2 * h)
    return grad


def test_ot_cost_and_direction_match_the_reference_pixels():
    # eps large enough against the cost scale that 60 iterations converge in both codes (ott's
    # update order differs from the reference's; at convergence both are the same fixed point)
    fake = RNG.normal(size=(2, 2, 4, 4)) * 0.3  # [B, C, H, W], as the reference
    real = RNG.normal(size=(2, 2, 4, 4)) * 0.3 + 0.2
    eps, iters = 0.1, 60
    ours = vdot.ot_cost(
        jnp.asarray(fake.transpose(0, 2, 3, 1), jnp.float32),
        jnp.asarray(real.transpose(0, 2, 3, 1), jnp.float32),
        eps,
        iters,
        "pixels",
        2,
    )
    ref = _ref_pixels_cost(fake, real, eps, iters)
    np.testing.assert_allclose(float(ours), ref, rtol=2e-3)
    g_ref = _fd_grad(lambda f: _ref_pixels_cost(f, real, eps, iters), fake)  # [B, C, H, W]
    u_ref = g_ref / (np.linalg.norm(g_ref.reshape(2, -1), axis=1)[:, None, None, None] + 1e-8)
    u = vdot.ot_direction(
        jnp.asarray(fake.transpose(0, 2, 3, 1), jnp.float32),
        jnp.asarray(real.transpose(0, 2, 3, 1), jnp.float32),
        eps,
        iters,
        "pixels",
        2,
    )
    np.testing.assert_allclose(np.asarray(u), u_ref.transpose(0, 2, 3, 1), atol=5e-3)


def test_batch_features_cost_matches_the_reference_on_sample_points():
    x, y = RNG.normal(size=(16, 2)), RNG.normal(size=(16, 2)) + 0.5
    ours = vdot.ot_cost(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1.0, 60)
    np.testing.assert_allclose(float(ours), _ref_cost(x, y, 1.0, 60), rtol=1e-3)


class _Cfg(dict):
    __getattr__ = dict.__getitem__


def test_generator_gradient_is_dmd_plus_the_reference_ot_step():
    """d L / d x0 = 0.2 * DMD's gradient + 0.8 * 0.1 * u / B (compute_ot_loss 494-499: the sum
    reduction of 0.5 (x - sg(x - 0.1 u))^2 has gradient 0.1 u; mean over the DDP batch)."""
    from didistill import divergences
    from didistill.configs import toy2d

    cfg = toy2d.get_config("vdot").distill
    b = 8
    x0 = jnp.asarray(RNG.normal(size=(b, 2)), jnp.float32)
    d_teacher = jnp.asarray(RNG.normal(size=(b, 2)), jnp.float32)
    d_fake = jnp.asarray(RNG.normal(size=(b, 2)), jnp.float32)
    log_r = jnp.zeros(b)
    rkl = divergences.get("reverse_kl")
    grad = jax.grad(vdot.vdot_generator_loss)(x0, d_teacher, d_fake, log_r, rkl, cfg)
    omega = 1.0 / (jnp.mean(jnp.abs(x0 - d_teacher), axis=1, keepdims=True) + 1e-6)
    dmd = omega * (d_fake - d_teacher) / (b * 2)
    u = vdot.ot_direction(d_fake, d_teacher, cfg.ot_epsilon, cfg.ot_iterations, "batch")
    np.testing.assert_allclose(grad, 0.2 * dmd + 0.8 * 0.1 * u / b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(jnp.linalg.norm(u, axis=1), 1.0, rtol=1e-5)
