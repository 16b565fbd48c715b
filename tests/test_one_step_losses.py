"""One-step distillation losses: gradients against the objectives they claim to descend.

The Uni-Instruct check follows `docs/uni_instruct_derivation.md`: at a fixed noise level, with
exact teacher/student denoisers and a frozen weight `w0(x) = h(r_theta0(x))`, the surrogate's
gradient w.r.t. a Gaussian generator's `(mu, s)` equals the derivative of
`F(theta) = E_{q_theta,t}[w0 (s_q - s_p)^2]`, computed by quadrature and finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from scipy import stats

from didistill.distill.one_step import losses as L
from didistill.divergences import get

SIGMA = 0.8
THETA0 = np.array([0.3, 0.9])  # generator x0 = mu + s z
MEANS, STDS, WEIGHTS = np.array([-1.0, 1.5]), np.array([0.5, 0.7]), np.array([0.3, 0.7])


def _log_p_t(x, xp=jnp):  # noised 2-component teacher mixture, 1-D
    var = STDS**2 + SIGMA**2
    comp = -0.5 * (x[..., None] - MEANS) ** 2 / var - 0.5 * xp.log(2 * np.pi * var)
    return (
        jax.scipy.special.logsumexp(comp + np.log(WEIGHTS), axis=-1)
        if xp is jnp
        else (np.logaddexp.reduce(comp + np.log(WEIGHTS), axis=-1))
    )


def _score_p(x):
    return jax.vmap(jax.grad(lambda v: _log_p_t(v)))(x)


def _log_q_t(x, theta, xp=jnp):
    var = theta[1] ** 2 + SIGMA**2
    return -0.5 * (x - theta[0]) ** 2 / var - 0.5 * xp.log(2 * np.pi * var)


def _score_q(x, theta):
    return -(x - theta[0]) / (theta[1] ** 2 + SIGMA**2)


def _stratified(n):
    return stats.norm.ppf((np.arange(n) + 0.5) / n)


def _surrogate_grad(divergence, loss_name, alpha=0.5):
    z, e = np.meshgrid(_stratified(400), _stratified(400))
    z, e = jnp.asarray(z.ravel()), jnp.asarray(e.ravel())
    theta0 = jnp.asarray(THETA0)

    def loss(theta):
        x0 = theta[0] + theta[1] * z
        xt = x0 + SIGMA * e
        d_teacher = xt + SIGMA**2 * _score_p(xt)
        d_fake = xt + SIGMA**2 * _score_q(xt, theta0)  # exact student denoiser, frozen params
        log_r = jax.lax.stop_gradient(_log_p_t(xt) - _log_q_t(xt, theta0))
        if loss_name == "sid":
            return L.sid_generator_loss(
                x0[:, None], d_teacher[:, None], d_fake[:, None], 0.5, "none"
            )
        args = (x0[:, None], jnp.full(x0.shape, SIGMA), d_teacher[:, None], d_fake[:, None])
        sim, di = L.uni_instruct_terms(
            *args, log_r, divergence, alpha=alpha, normalize=False, time_weight="none"
        )
        return {"uni": sim + di, "di": di}[loss_name]

    return np.asarray(jax.grad(loss)(theta0)), float(loss(theta0))


def _objective(theta, divergence):
    """F(theta) = int q_theta,t(x) w0(x) (s_q,theta - s_p)^2 dx on a fine grid (float64)."""
    x = np.linspace(-12, 12, 200001)
    log_r0 = _log_p_t(x, np) - _log_q_t(x, THETA0, np)
    w0 = np.asarray(divergence.weight(jnp.asarray(log_r0)))
    s_p = np.asarray(_score_p(jnp.asarray(x)))
    q = np.exp(_log_q_t(x, theta, np))
    return np.trapezoid(q * w0 * (_score_q(x, theta) - s_p) ** 2, x)


@pytest.mark.parametrize(
    "name,params",
    [("reverse_kl", {}), ("forward_kl", {}), ("jensen_shannon", {}), ("alpha", {"alpha": 0.5})],
)
def test_uni_instruct_gradient_matches_expanded_objective(name, params):
    with enable_x64(True):
        divergence = get(name, **params)
        grad, _ = _surrogate_grad(divergence, "uni")
        step = 1e-4
        fd = []
        for i in range(2):
            d = np.zeros(2)
            d[i] = step
            fd.append(
                (_objective(THETA0 + d, divergence) - _objective(THETA0 - d, divergence))
                / (2 * step)
            )
        # d F / d theta = (2 / sigma^4) d E[surrogate] / d theta  (surrogate carries P / 2).
        np.testing.assert_allclose(2 * grad / SIGMA**4, fd, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_uni_instruct_di_term_is_exact_at_every_alpha(alpha):
    """The Diff-Instruct term multiplies grad h by the exact integrand P_{1/2}, whatever the
    config's SiD alpha: DI(alpha) + SIM(1/2) equals the objective's finite differences (with
    P_alpha as multiplier the term would be noise at alpha 1.0 and flip sign at 1.2)."""
    with enable_x64(True):
        divergence = get("forward_kl")
        g_di, _ = _surrogate_grad(divergence, "di", alpha)
        g_di_half, _ = _surrogate_grad(divergence, "di", 0.5)
        g_full_half, _ = _surrogate_grad(divergence, "uni", 0.5)
        np.testing.assert_allclose(g_di, g_di_half, rtol=1e-12)
        step = 1e-4
        fd = [
            (_objective(THETA0 + d, divergence) - _objective(THETA0 - d, divergence)) / (2 * step)
            for d in np.eye(2) * step
        ]
        np.testing.assert_allclose(2 * g_full_half / SIGMA**4, fd, rtol=2e-2, atol=2e-3)
        assert np.linalg.norm(g_di) > 0.05 * np.linalg.norm(g_full_half)  # the term matters


def test_uni_instruct_with_reverse_kl_is_sid():
    with enable_x64(True):
        g_ui, v_ui = _surrogate_grad(get("reverse_kl"), "uni")
        g_sid, v_sid = _surrogate_grad(None, "sid")
    np.testing.assert_allclose(g_ui, g_sid, rtol=1e-10)
    np.testing.assert_allclose(v_ui, v_sid, rtol=1e-10)


def test_f_distill_gradient_is_weighted_denoiser_difference():
    x0 = jnp.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    d_teacher = jnp.array([[0.1, 0.8], [1.5, -0.5], [0.4, 0.7]])
    d_fake = jnp.array([[0.3, 1.1], [2.2, -1.2], [0.5, 0.4]])
    log_r = jnp.array([-1.0, 0.0, 2.0])
    div = get("forward_kl")
    grad = jax.grad(L.f_distill_generator_loss)(x0, d_teacher, d_fake, log_r, div, False, "none")
    expected = jnp.exp(log_r)[:, None] * (d_fake - d_teacher) / (3 * 2)  # mean over B and D
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    grad_dmd = jax.grad(L.f_distill_generator_loss)(x0, d_teacher, d_fake, log_r, div, False)
    omega = 1.0 / (jnp.mean(jnp.abs(x0 - d_teacher), axis=1) + 1e-6)
    np.testing.assert_allclose(grad_dmd, expected * omega[:, None], rtol=1e-5)


def test_bin_normalisation_makes_bin_means_one():
    key = jax.random.key(0)
    log_r = jax.random.normal(key, (512,))
    bins = jnp.arange(512) % 4
    out, running = L.bin_normalize_log_ratio(log_r, bins, num_bins=4)
    for b in range(4):
        np.testing.assert_allclose(jnp.mean(jnp.exp(out[bins == b])), 1.0, rtol=1e-4)
    out2, running2 = L.bin_normalize_log_ratio(log_r + 1.0, bins, 4, running, ema_rate=0.5)
    np.testing.assert_allclose(running2, 0.5 * running + 0.5 * running * np.e, rtol=1e-5)


def test_process_log_ratio_clips_like_fastgen():
    out = L.process_log_ratio(jnp.array([-30.0, 0.0, 1.0, 30.0]))
    np.testing.assert_allclose(np.exp(out), [0.1, 1.0, np.e, 20.0], rtol=1e-5)


def test_discriminator_loss_optimum_is_log_ratio():
    # For a fixed x, the expected loss p * softplus(-l) + q * softplus(l) is minimal at log(p/q).
    p, q = 0.7, 0.2
    grid = jnp.linspace(-5, 5, 100001)
    vals = p * jax.nn.softplus(-grid) + q * jax.nn.softplus(grid)
    assert abs(float(grid[jnp.argmin(vals)]) - np.log(p / q)) < 1e-3
