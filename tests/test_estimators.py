"""Estimators: Monte Carlo averages against Gaussian closed forms, and the f-GAN bound."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from didistill.divergences import (
    estimate,
    estimate_self_normalized,
    get,
    names,
    self_normalize_log_ratio,
    variational_bound,
)

# p = N(M1, S1^2) is the target, q = N(M2, S2^2) the model. q is wider than p, so r = p/q is
# bounded and every f(r) with alpha >= 0 has finite variance under q.
WIDE = (0.3, 0.8, -0.5, 1.3)
# Equal variances: r = exp(linear in x), every divergence and every moment is finite.
SHIFT = (0.6, 1.0, 0.0, 1.0)
N_SAMPLES = 200_000
ALL = [(n, {}) for n in names() if n != "alpha"] + [
    ("alpha", {"alpha": a}) for a in (-1.0, 0.5, 2.0)
]
ALL_IDS = [f"{n}{p.get('alpha', '')}" for n, p in ALL]


def log_ratio(x, pair):
    m1, s1, m2, s2 = pair
    return stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2)


def closed_form(name, pair, alpha=None):
    """Known divergences between Gaussians (reference notes section 5, derived)."""
    m1, s1, m2, s2 = pair
    d2 = (m1 - m2) ** 2
    kl_pq = np.log(s2 / s1) + (s1**2 + d2) / (2 * s2**2) - 0.5
    kl_qp = np.log(s1 / s2) + (s2**2 + d2) / (2 * s1**2) - 0.5
    if name == "alpha":
        s_a2 = alpha * s2**2 + (1 - alpha) * s1**2
        integral = s1 ** (1 - alpha) * s2**alpha / np.sqrt(s_a2)
        integral *= np.exp(-alpha * (1 - alpha) * d2 / (2 * s_a2))  # int p^a q^(1-a)
        return (integral - 1) / (alpha * (alpha - 1))
    bc = np.sqrt(2 * s1 * s2 / (s1**2 + s2**2)) * np.exp(-d2 / (4 * (s1**2 + s2**2)))
    return {
        "forward_kl": kl_pq,
        "reverse_kl": kl_qp,
        "jeffreys": kl_pq + kl_qp,
        "squared_hellinger": 1 - bc,
        "pearson_chi2": s2**2 / (s1 * np.sqrt(2 * s2**2 - s1**2)) * np.exp(d2 / (2 * s2**2 - s1**2))
        - 1,
    }[name]


CLOSED_FORMS = (
    "forward_kl",
    "reverse_kl",
    "jeffreys",
    "squared_hellinger",
    "pearson_chi2",
    "alpha",
)


def quadrature(div, pair):
    """int q f(p/q) dx on a fine grid, float64."""
    x = np.linspace(-16.0, 16.0, 64001)
    with jax.enable_x64(True):
        f = np.asarray(div.f(jnp.asarray(log_ratio(x, pair))))
    return np.trapezoid(stats.norm.pdf(x, pair[2], pair[3]) * f, x)


@pytest.fixture(scope="module")
def samples():
    """x ~ q for both pairs, from a fixed key; log r in float32 as a model would produce it."""
    z = np.asarray(jax.random.normal(jax.random.key(0), (N_SAMPLES,)), np.float64)
    return {
        pair: jnp.asarray(log_ratio(pair[2] + pair[3] * z, pair), jnp.float32)
        for pair in (WIDE, SHIFT)
    }


class TestOracles:
    @pytest.mark.parametrize("pair", [WIDE, SHIFT])
    @pytest.mark.parametrize(
        "name,params",
        [("forward_kl", {}), ("reverse_kl", {}), ("jeffreys", {}), ("squared_hellinger", {})]
        + [("pearson_chi2", {}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 2.0})],
    )
    def test_closed_forms_agree_with_quadrature(self, name, params, pair):
        exact = closed_form(name, pair, params.get("alpha"))
        np.testing.assert_allclose(quadrature(get(name, **params), pair), exact, rtol=1e-8)

    def test_reference_values(self):
        # Reference notes section 5 items 5-7 (p, q = N(0.3, 0.8^2), N(-0.5, 1.3^2)).
        np.testing.assert_allclose(closed_form("alpha", WIDE, 0.5), 0.4714936669297608)
        np.testing.assert_allclose(closed_form("alpha", WIDE, 0.3), 0.5588481775179709)
        tv = quadrature(get("total_variation"), SHIFT)
        np.testing.assert_allclose(tv, 2 * stats.norm.cdf(0.3) - 1, rtol=1e-6)


class TestEstimate:
    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    def test_monte_carlo_matches_exact_within_standard_error(self, name, params, samples):
        div = get(name, **params)
        pairs = [SHIFT] if (name == "neyman_chi2" or params.get("alpha", 0) < 0) else [WIDE, SHIFT]
        for pair in pairs:  # neyman and alpha < 0 have infinite variance (or value) on WIDE
            log_r = samples[pair]
            values = np.asarray(div.f(log_r), np.float64)
            standard_error = values.std() / np.sqrt(N_SAMPLES)
            closed = name in CLOSED_FORMS and params.get("alpha", 0.5) > 0
            exact = (
                closed_form(name, pair, params.get("alpha")) if closed else quadrature(div, pair)
            )
            got = float(estimate(div, log_r))
            assert abs(got - exact) < 5 * standard_error + 1e-5, (pair, got, exact)

    def test_name_params_shapes_and_jit(self, samples):
        log_r = samples[WIDE][:1000].reshape(250, 4)  # [n, batch]
        div = get("alpha", alpha=0.5)
        by_name = estimate("alpha", log_r, alpha=0.5)
        chex.assert_shape(by_name, (4,))
        np.testing.assert_allclose(by_name, jnp.mean(div.f(log_r), axis=0), rtol=1e-6)
        jitted = jax.jit(estimate, static_argnums=0)
        np.testing.assert_allclose(jitted(div, log_r), by_name, rtol=1e-6)
        with pytest.raises(ValueError, match="takes alpha"):
            estimate("alpha", log_r)
        with pytest.raises(ValueError, match="given with an FDivergence"):
            estimate(div, log_r, alpha=0.5)

    def test_self_normalized_removes_an_unknown_constant(self, samples):
        log_r = samples[WIDE]
        normalized = self_normalize_log_ratio(log_r + 3.7)
        np.testing.assert_allclose(jnp.mean(jnp.exp(normalized)), 1.0, rtol=1e-4)
        for name in ("forward_kl", "reverse_kl", "jensen_shannon"):
            shifted = estimate_self_normalized(name, log_r + 3.7)
            np.testing.assert_allclose(shifted, estimate_self_normalized(name, log_r), atol=1e-4)
            values = np.asarray(get(name).f(log_r), np.float64)
            tolerance = 5 * values.std() / np.sqrt(N_SAMPLES) + 2e-3  # + O(1/n) bias bound
            assert abs(float(shifted) - quadrature(get(name), WIDE)) < tolerance


def bisect_inverse(fn, target, lo=-60.0, hi=60.0, steps=80):
    """The v with fn(v) = target for increasing fn (clamped to [lo, hi]), float64."""
    lo, hi = np.full_like(target, lo), np.full_like(target, hi)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        below = np.asarray(fn(jnp.asarray(mid))) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


class TestVariationalBound:
    """Stratified samples z_i = Phi^-1((i + 1/2)/n) make the sample means near-exact integrals,
    so the bound can be checked deterministically: below D_f for any critic, equal at V*."""

    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    def test_below_the_divergence_and_tight_at_the_optimal_critic(self, name, params):
        z = stats.norm.ppf((np.arange(20000) + 0.5) / 20000)
        x_p, x_q = SHIFT[0] + SHIFT[1] * z, SHIFT[2] + SHIFT[3] * z
        exact = quadrature(get(name, **params), SHIFT)
        with jax.enable_x64(True):
            div = get(name, **params)

            def optimal_critic(x):  # g(V*(x)) = f'(r(x))
                target = np.asarray(div.f_prime(jnp.asarray(log_ratio(x, SHIFT))))
                return bisect_inverse(div.activation, target)

            v_p, v_q = optimal_critic(x_p), optimal_critic(x_q)
            tight = float(variational_bound(div, jnp.asarray(v_p), jnp.asarray(v_q)))
            others = [
                float(variational_bound(div, jnp.asarray(a), jnp.asarray(b)))
                for a, b in [(0.5 * v_p, 0.5 * v_q), (v_p + 0.3, v_q + 0.3), (0 * z, 0 * z)]
                + [(np.sin(x_p), np.sin(x_q)), (x_p, x_q)]
            ]
        # Pearson and Neyman put weight e^(1.2 x) in the tails: midpoint error ~1e-3 there.
        np.testing.assert_allclose(tight, exact, rtol=2e-3, atol=1e-4)
        assert all(b <= exact + 1e-4 for b in others), (others, exact)
        assert all(b < tight + 1e-6 for b in others)

    def test_documented_optimal_critics(self):
        log_r = jnp.linspace(-5.0, 5.0, 11)
        for name, critic in [
            ("reverse_kl", log_r),
            ("jensen_shannon", log_r),
            ("softened_reverse_kl", log_r),
            ("forward_kl", 1 + log_r),
            ("squared_hellinger", log_r / 2),
            ("neyman_chi2", 2 * log_r),
        ]:
            div = get(name)
            np.testing.assert_allclose(div.activation(critic), div.f_prime(log_r), rtol=1e-5)


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_estimators_under_jit_vmap_grad(self):
        log_r = jnp.linspace(-4.0, 4.0, 24).reshape(8, 3)
        critic_p, critic_q = jnp.sin(log_r), jnp.cos(log_r)
        for name in ("jensen_shannon", "jeffreys"):
            div = get(name)
            both = self.variant(
                lambda lr, cp, cq, div=div: (
                    estimate(div, lr),
                    estimate_self_normalized(div, lr),
                    variational_bound(div, cp, cq),
                )
            )
            got = both(log_r, critic_p, critic_q)
            chex.assert_shape(got, [(3,)] * 3)
            np.testing.assert_allclose(got[0], estimate(div, log_r), rtol=1e-6)
            np.testing.assert_allclose(
                got[2], variational_bound(div, critic_p, critic_q), rtol=1e-5
            )
            # grad of the mean over 8 samples is r f'(r) / 8; vmap over the batch axis.
            grad = self.variant(jax.grad(lambda lr, div=div: estimate(div, lr).sum()))(log_r)
            np.testing.assert_allclose(
                grad, jnp.exp(log_r) * div.f_prime(log_r) / 8, rtol=1e-5, atol=1e-6
            )
            per_column = jax.vmap(lambda c, div=div: estimate(div, c), in_axes=1)(log_r)
            np.testing.assert_allclose(per_column, got[0], rtol=1e-6)
