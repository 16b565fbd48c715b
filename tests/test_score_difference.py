"""The f-distill surrogate: its gradient is h(r) (s_q - s_p) / B, and through a reparameterised
generator it is the gradient of the exact f-divergence (Xu, Nie, Vahdat 2025)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from didistill.divergences import get, names, score_difference_loss, score_difference_weights

THETA0 = np.array([0.2, 1.3])  # student q_theta = N(mu, s^2), x = mu + s z
TARGETS = {  # (weights, means, stds); the student is wider, so r = p/q is bounded
    "gaussian": (np.array([1.0]), np.array([-0.3]), np.array([0.9])),
    "mixture": (np.array([0.4, 0.6]), np.array([-1.0, 0.8]), np.array([0.6, 0.7])),
}
# Every weight that is integrable here (neyman_chi2 and alpha < 0 have h ~ 1/r, whose
# expectation diverges when q is wider than p).
THEOREM_CASES = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("jensen_shannon", {}),
    ("squared_hellinger", {}),
    ("jeffreys", {}),
    ("pearson_chi2", {}),
    ("softened_reverse_kl", {}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 2.0}),
]
WEIGHTED = [(n, {}) for n in names() if n not in ("alpha", "total_variation")]
WEIGHTED += [("alpha", {"alpha": a}) for a in (-1.0, 0.5, 2.0)]


def log_p(x, target):
    """Exact log density of the Gaussian-mixture target and its score, NumPy float64."""
    weights, means, stds = target
    comp = stats.norm.logpdf(x[..., None], means, stds) + np.log(weights)  # [..., K]
    log_density = np.logaddexp.reduce(comp, axis=-1)
    responsibilities = np.exp(comp - log_density[..., None])
    score = np.sum(responsibilities * (means - x[..., None]) / stds**2, axis=-1)
    return log_density, score


def log_q(x, theta):
    return stats.norm.logpdf(x, theta[0], theta[1])


def surrogate_gradient(div, target, normalize=False, batch=20000):
    """d/dtheta of the surrogate at THETA0, with stratified z_i = Phi^-1((i + 1/2) / B).

    Scores and log_r are constants of the surrogate (stop_gradient), so they are evaluated
    once at x(THETA0); only x = mu + s z carries the dependence on theta."""
    z = stats.norm.ppf((np.arange(batch) + 0.5) / batch)
    x0 = THETA0[0] + THETA0[1] * z
    lp, score_p = log_p(x0, target)
    score_q = -(x0 - THETA0[0]) / THETA0[1] ** 2  # grad_x log q_theta at fixed theta
    log_r = lp - log_q(x0, THETA0)
    constants = [jnp.asarray(a) for a in (score_p[:, None], score_q[:, None], log_r)]

    def loss(theta):
        x = theta[0] + theta[1] * jnp.asarray(z)  # [B]
        return score_difference_loss(x[:, None], *constants, div, normalize)

    return np.asarray(jax.grad(loss)(jnp.asarray(THETA0)))


def exact_divergence(div, target, theta):
    """D_f(p || q_theta) = int q_theta f(p / q_theta) dx on a fine grid (float64)."""
    x = np.linspace(-14.0, 14.0, 28001)
    lq = log_q(x, theta)
    f = np.asarray(div.f(jnp.asarray(log_p(x, target)[0] - lq)))
    return np.trapezoid(np.exp(lq) * f, x)


class TestFDistillTheorem:
    @pytest.mark.parametrize(
        "name,params,target",
        [(n, p, "mixture") for n, p in THEOREM_CASES]
        + [(n, p, "gaussian") for n, p in THEOREM_CASES if n in ("reverse_kl", "forward_kl")],
    )
    def test_gradient_is_the_divergence_gradient(self, name, params, target):
        with jax.enable_x64(True):
            div = get(name, **params)
            got = surrogate_gradient(div, TARGETS[target])
            step, finite_differences = 1e-4, []
            for i in range(2):
                delta = np.eye(2)[i] * step
                plus = exact_divergence(div, TARGETS[target], THETA0 + delta)
                minus = exact_divergence(div, TARGETS[target], THETA0 - delta)
                finite_differences.append((plus - minus) / (2 * step))
        np.testing.assert_allclose(got, finite_differences, rtol=2e-3, atol=2e-5)

    def test_normalize_rescales_by_the_mean_weight(self):
        with jax.enable_x64(True):
            div = get("forward_kl")
            target = TARGETS["mixture"]
            plain = surrogate_gradient(div, target, normalize=False)
            normalized = surrogate_gradient(div, target, normalize=True)
            z = stats.norm.ppf((np.arange(20000) + 0.5) / 20000)
            x = THETA0[0] + THETA0[1] * z
            mean_h = float(
                jnp.mean(div.weight(jnp.asarray(log_p(x, target)[0] - log_q(x, THETA0))))
            )
        np.testing.assert_allclose(normalized, plain / mean_h, rtol=1e-10)


def random_inputs(batch=6, key=0):
    keys = jax.random.split(jax.random.key(key), 4)
    x = jax.random.normal(keys[0], (batch, 2, 3))
    score_p = jax.random.normal(keys[1], (batch, 2, 3))
    score_q = jax.random.normal(keys[2], (batch, 2, 3))
    log_r = 3.0 * jax.random.normal(keys[3], (batch,))
    return x, score_p, score_q, log_r


class TestSurrogate:
    @pytest.mark.parametrize("normalize", [False, True])
    @pytest.mark.parametrize("name,params", WEIGHTED, ids=[f"{n}{p}" for n, p in WEIGHTED])
    def test_per_sample_gradient(self, name, params, normalize):
        div = get(name, **params)
        x, score_p, score_q, log_r = random_inputs()
        grads = jax.grad(score_difference_loss, argnums=(0, 1, 2, 3))(
            x, score_p, score_q, log_r, div, normalize
        )
        h = div.weight(log_r)
        weights = h / jnp.mean(h) if normalize else h
        want = weights[:, None, None] * (score_q - score_p) / x.shape[0]
        np.testing.assert_allclose(grads[0], want, rtol=1e-5, atol=1e-7)
        for stopped in grads[1:]:  # scores and log_r are under stop_gradient
            np.testing.assert_array_equal(stopped, 0.0)
        # So a descent step moves every sample along +h (s_p - s_q).
        np.testing.assert_allclose(
            -grads[0], weights[:, None, None] * (score_p - score_q) / 6, rtol=1e-5, atol=1e-7
        )

    def test_weights_are_stable_for_extreme_ratios(self):
        log_r = jnp.array([-1e4, -50.0, 0.0, 50.0, 1e4], jnp.float32)
        x = jnp.ones((5, 2))
        for name, params in WEIGHTED:
            div = get(name, **params)
            weights = score_difference_weights(log_r, div)
            assert np.all(np.isfinite(weights)), name
            # float32 log_h = +-1e4 carries an absolute rounding error of ~1e-3 / 2^10.
            np.testing.assert_allclose(jnp.mean(weights), 1.0, rtol=1e-3)
            grad = jax.grad(score_difference_loss)(x, -x, x, log_r, div)
            assert np.all(np.isfinite(grad)), name

    def test_errors_and_names(self):
        x, score_p, score_q, log_r = random_inputs()
        with pytest.raises(ValueError, match="no weight h"):
            score_difference_loss(x, score_p, score_q, log_r, "total_variation")
        with pytest.raises(ValueError, match="shapes"):
            score_difference_loss(x, score_p[:, 0], score_q, log_r, "reverse_kl")
        with pytest.raises(ValueError, match="shapes"):
            score_difference_loss(x, score_p, score_q, log_r[:3], "reverse_kl")
        by_name = score_difference_loss(x, score_p, score_q, log_r, "forward_kl", False)
        by_object = score_difference_loss(x, score_p, score_q, log_r, get("forward_kl"), False)
        np.testing.assert_allclose(by_name, by_object)
        chex.assert_shape(by_name, ())


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_vmap_grad(self):
        x, score_p, score_q, log_r = random_inputs()
        div = get("jensen_shannon")
        grad_fn = self.variant(
            jax.grad(lambda x, sp, sq, lr: score_difference_loss(x, sp, sq, lr, div))
        )
        got = grad_fn(x, score_p, score_q, log_r)
        want = jax.grad(score_difference_loss)(x, score_p, score_q, log_r, div)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        # vmap over an ensemble axis of 3 independent batches.
        stacked = [jnp.stack([a] * 3) for a in (x, score_p, score_q, log_r)]
        per_member = jax.vmap(grad_fn)(*stacked)
        np.testing.assert_allclose(per_member, jnp.stack([want] * 3), rtol=1e-6)
