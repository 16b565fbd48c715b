"""Tests for didistill.diffusion.masked (MDLM): schedules, masking, SUBS, NELBO, sampler.

The NELBO identities are checked on a tiny joint p over V^L (V = 2, L = 3) with the exact
denoiser x*(z)^l = p(x^l | unmasked tokens of z), built by enumeration:

1. exact denoiser, alpha_1 = 0: NELBO(x) = -log p(x) for every x (not only on average);
2. any denoiser q: NELBO(x) = sum_{k=1}^{L} (1/k) mean_{|S| = k} sum_{l in S} -log q^l(x_{-S})[x^l]
   (the any-order autoregressive NLL), hence E_p NELBO >= H(p).
The time integral is done by Gauss-Legendre quadrature (the integrand is smooth: for the
log-linear schedule a polynomial) over an exact sum over the 2^L masks, so these are
deterministic; a separate test checks that the Monte Carlo `nelbo` is unbiased for it.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.diffusion import masked

V, L = 2, 3
SEQS = np.array(list(itertools.product(range(V), repeat=L)))  # [V^L, L]
ZS = np.array(list(itertools.product(range(V + 1), repeat=L)))  # [(V+1)^L, L]
P = np.random.default_rng(0).dirichlet(np.ones(V**L))  # joint law of the tiny source


def exact_table(p=P):
    """logits [(V+1)^L, L, V+1] of the exact denoiser (mask logit -1e9; SUBS makes it -inf)."""
    table = np.full((len(ZS), L, V + 1), -1e9)
    for code, z in enumerate(ZS):
        w = p * np.all((z == V) | (SEQS == z), axis=1)
        with np.errstate(divide="ignore"):  # a fixed token's marginal is one-hot
            for pos in range(L):
                table[code, pos, :V] = np.log(np.bincount(SEQS[:, pos], w, V) / w.sum())
    return table


def table_logits_fn(table):
    table = jnp.asarray(table, jnp.float32)
    weights = jnp.asarray((V + 1) ** np.arange(L - 1, -1, -1))

    def logits_fn(xt, t):
        return table[xt @ weights]  # [B, L, V + 1]

    return logits_fn


def quadrature_nelbo(logits_fn, x, schedule, n=48, t_min=0.0):
    """E_{t ~ U[t_min, 1], z ~ q(.|x)} [NELBO integrand] by Gauss-Legendre and exact mask sums
    (for t_min = 0: the NELBO)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    ts, wt = t_min + 0.5 * (1 - t_min) * (nodes + 1), 0.5 * weights  # on [t_min, 1]
    masks = np.array(list(itertools.product([0, 1], repeat=L)), bool)  # [2^L, L]
    t = np.repeat(ts, len(masks))  # [n 2^L]
    m = np.tile(masks, (n, 1))  # [n 2^L, L]
    x0 = np.broadcast_to(x, m.shape)
    z = jnp.asarray(np.where(m, V, x0), jnp.int32)
    p_mask = np.asarray(schedule.mask_prob(t), np.float64)[:, None]
    prob = np.prod(np.where(m, p_mask, 1 - p_mask), axis=1)  # [n 2^L]
    lp = masked.subs_log_probs(logits_fn(z, jnp.asarray(t)), z)
    vals = masked.nelbo_from_log_probs(lp, jnp.asarray(x0), z, jnp.asarray(t), schedule)
    return float(np.sum(np.repeat(wt, len(masks)) * prob * np.asarray(vals, np.float64)))


class TestSchedules:
    @pytest.mark.parametrize("name", ["loglinear", "cosine"])
    def test_endpoints_derivative_and_weight(self, name):
        s = masked.get_schedule(name, eps=1e-3)
        np.testing.assert_allclose(s.alpha(0.0), 1.0, atol=1e-7)
        np.testing.assert_allclose(s.alpha(1.0), 1e-3, atol=1e-6)
        t = jnp.linspace(0.05, 0.95, 7)
        np.testing.assert_allclose(s.mask_prob(t), 1 - s.alpha(t), atol=1e-6)
        np.testing.assert_allclose(s.dalpha(t), jax.vmap(jax.grad(s.alpha))(t), rtol=1e-4)
        assert np.all(np.asarray(s.loss_weight(t)) > 0)
        assert np.all(np.diff(np.asarray(s.alpha(t))) < 0)

    def test_loglinear_weight_is_one_over_t(self):
        t = jnp.array([0.1, 0.5, 1.0])
        np.testing.assert_allclose(masked.LogLinearSchedule(0.0).loss_weight(t), 1 / t, rtol=1e-6)
        np.testing.assert_allclose(masked.LogLinearSchedule(0.1).loss_weight(t), 1 / t, rtol=1e-6)

    def test_bad_name(self):
        with pytest.raises(ValueError, match="unknown noise schedule"):
            masked.get_schedule("linear")


class TestForwardMask:
    @pytest.mark.parametrize("t", [0.0, 0.2, 0.7, 1.0])
    def test_masked_fraction(self, t):
        s = masked.CosineSchedule()
        x0 = jnp.zeros((2048, 32), jnp.int32) + 3
        xt = masked.forward_mask(jax.random.key(0), x0, t, s, mask_id=5)
        frac = float(jnp.mean(xt == 5))
        assert abs(frac - float(s.mask_prob(t))) < 4 * math.sqrt(0.25 / x0.size) + 1e-6
        assert bool(jnp.all((xt == 5) | (xt == x0)))

    def test_per_row_times(self):
        t = jnp.array([0.0, 1.0])
        xt = masked.forward_mask(jax.random.key(1), jnp.ones((2, 500), jnp.int32), t,
                                 masked.LogLinearSchedule(0.0), mask_id=9)  # fmt: skip
        assert not bool(jnp.any(xt[0] == 9)) and bool(jnp.all(xt[1] == 9))


class TestSubs:
    def test_invariants(self):
        logits = jax.random.normal(jax.random.key(0), (3, 5, 7))  # V = 6, mask id 6
        xt = jnp.array([[6, 1, 6, 0, 5]] * 3)
        lp = masked.subs_log_probs(logits, xt)
        np.testing.assert_allclose(jax.nn.logsumexp(lp, axis=-1), 0.0, atol=1e-6)
        assert bool(jnp.all(lp[..., 6] == -jnp.inf))  # never predicts [MASK]
        carried = xt != 6
        onehot = jax.nn.one_hot(xt, 7) > 0
        assert bool(jnp.all(jnp.where(carried[..., None] & onehot, lp, 0.0) == 0.0))
        assert bool(jnp.all(jnp.where(carried[..., None] & ~onehot, lp, -jnp.inf) == -jnp.inf))
        # masked positions: softmax over the 6 real tokens only
        np.testing.assert_allclose(lp[:, 0, :6], jax.nn.log_softmax(logits[:, 0, :6]), atol=1e-6)

    def test_nelbo_gradient_finite_with_nothing_masked_at_t0(self):
        x0 = jnp.array([[0, 1, 1]])

        def f(scale):
            lp = masked.subs_log_probs(scale * jnp.ones((1, 3, 3)), x0)
            return masked.nelbo_from_log_probs(lp, x0, x0, 0.0, masked.LogLinearSchedule(0.0))[0]

        assert float(f(1.0)) == 0.0 and np.isfinite(float(jax.grad(f)(1.0)))


class TestNelbo:
    @pytest.mark.parametrize("name", ["loglinear", "cosine"])
    def test_exact_denoiser_gives_exact_nll(self, name):
        fn = table_logits_fn(exact_table())
        s = masked.get_schedule(name, eps=0.0)
        got = [quadrature_nelbo(fn, x, s) for x in SEQS]
        np.testing.assert_allclose(got, -np.log(P), rtol=1e-4)

    def test_any_denoiser_is_any_order_nll_and_bounds_entropy(self):
        table = exact_table() + np.random.default_rng(1).normal(size=(len(ZS), L, V + 1))
        fn = table_logits_fn(table)
        log_q = np.asarray(masked.subs_log_probs(jnp.asarray(table), jnp.asarray(ZS)))
        codes = {tuple(z): i for i, z in enumerate(ZS)}
        nelbos = []
        for x in SEQS:
            want = 0.0
            for k in range(1, L + 1):
                subsets = list(itertools.combinations(range(L), k))
                for subset in subsets:
                    z = x.copy()
                    z[list(subset)] = V
                    nll = -sum(log_q[codes[tuple(z)], pos, x[pos]] for pos in subset)
                    want += nll / (k * len(subsets))
            got = quadrature_nelbo(fn, x, masked.LogLinearSchedule(0.0))
            np.testing.assert_allclose(got, want, rtol=1e-4)
            nelbos.append(got)
        assert np.dot(P, nelbos) > -np.dot(P, np.log(P)) + 1e-3  # E_p NELBO > H(p)

    @pytest.mark.parametrize("low_discrepancy", [True, False])
    def test_monte_carlo_estimate_is_unbiased(self, low_discrepancy):
        # t ~ U[t_min, 1] (the 1/t weight gives the estimator infinite variance at t_min = 0)
        fn = table_logits_fn(exact_table())
        s, t_min, n = masked.LogLinearSchedule(0.0), 0.01, 20000
        x0 = jnp.asarray(np.tile(SEQS, (n, 1)), jnp.int32)  # [n V^L, L], x cycles fastest
        est = masked.nelbo(fn, jax.random.key(3), x0, s, V, t_min=t_min,
                           low_discrepancy=low_discrepancy)  # fmt: skip
        est = np.asarray(est, np.float64).reshape(n, len(SEQS))
        want = [quadrature_nelbo(fn, x, s, t_min=t_min) for x in SEQS]
        np.testing.assert_array_less(np.abs(est.mean(0) - want), 5 * est.std(0) / math.sqrt(n))
        np.testing.assert_allclose(want, -np.log(P), rtol=0.02)  # t_min biases by O(t_min)


def counting_fn(logits_fn, counter):
    """Wraps logits_fn so every real evaluation increments counter[0] (host callback)."""

    def bump():
        counter[0] += 1

    def fn(xt, t):
        jax.debug.callback(bump)
        return logits_fn(xt, t)

    return fn


class TestSampler:
    def test_nfe_counts_real_evaluations(self):
        counter = [0]
        fn = counting_fn(table_logits_fn(exact_table()), counter)
        sched = masked.LogLinearSchedule()
        sample = jax.jit(masked.ancestral_sample, static_argnums=(0, 3, 4),
                         static_argnames="cache")  # fmt: skip
        for steps, cache in [(64, True), (5, False), (2, True)]:
            counter[0] = 0
            tokens, nfe = sample(fn, jax.random.key(steps), masked.all_masked(4, L, V), sched,
                                 steps, cache=cache)  # fmt: skip
            assert int(nfe) == counter[0]
            assert int(nfe) <= steps and bool(jnp.all(tokens < V))
            if cache:  # only steps after a change re-evaluate: NFE <= 1 + (B L tokens to reveal)
                assert int(nfe) <= min(steps, 1 + 4 * L)
            else:
                assert int(nfe) == steps

    def test_unchanging_input_costs_one_evaluation(self):
        x = jnp.asarray(SEQS[:3], jnp.int32)  # nothing masked: no step changes anything
        out, nfe = masked.ancestral_sample(table_logits_fn(exact_table()), jax.random.key(0), x,
                                           masked.CosineSchedule(), 50)  # fmt: skip
        assert int(nfe) == 1 and bool(jnp.all(out == x))

    def test_prompt_is_kept(self):
        x = jnp.array([[1, V, V], [V, 0, V]], jnp.int32)
        out, _ = masked.ancestral_sample(table_logits_fn(exact_table()), jax.random.key(0), x,
                                         masked.LogLinearSchedule(), 8)  # fmt: skip
        assert int(out[0, 0]) == 1 and int(out[1, 1]) == 0 and bool(jnp.all(out < V))

    def empirical(self, steps, n=8000, dtype=jnp.float32):
        fn = table_logits_fn(exact_table())
        out, _ = jax.jit(
            masked.ancestral_sample, static_argnums=(0, 3, 4), static_argnames="dtype"
        )(  # fmt: skip
            fn,
            jax.random.key(7),
            masked.all_masked(n, L, V),
            masked.LogLinearSchedule(),
            steps,
            dtype=dtype,
        )
        codes = np.asarray(out) @ (V ** np.arange(L - 1, -1, -1))
        return np.bincount(codes, minlength=V**L) / n

    def test_one_step_draws_the_product_of_marginals(self):
        marg = [np.bincount(SEQS[:, pos], P, V) for pos in range(L)]
        product = np.prod([marg[pos][SEQS[:, pos]] for pos in range(L)], axis=0)
        assert 0.5 * np.abs(self.empirical(1) - product).sum() < 0.04

    def test_many_steps_draw_the_joint(self):
        assert 0.5 * np.abs(self.empirical(200) - P).sum() < 0.05

    def test_float64_sampling(self):
        with pytest.raises(ValueError, match="x64"):
            self.empirical(2, n=4, dtype=jnp.float64)
        with jax.enable_x64(True):
            assert 0.5 * np.abs(self.empirical(200, dtype=jnp.float64) - P).sum() < 0.05


class TestTransitions:
    def test_step_distribution(self):
        sched = masked.LogLinearSchedule()
        t, s = 0.8, 0.3
        logits = jax.random.normal(jax.random.key(0), (1, L, V + 1))
        xt = jnp.array([[V, 1, V]])
        lp = masked.subs_log_probs(logits, xt)
        logq = masked.step_log_probs(lp, xt, sched.mask_prob(t), sched.mask_prob(s))
        np.testing.assert_allclose(jax.nn.logsumexp(logq, axis=-1), 0.0, atol=1e-5)
        reveal = (sched.alpha(s) - sched.alpha(t)) / (1 - sched.alpha(t))
        np.testing.assert_allclose(1 - jnp.exp(logq[0, 0, V]), reveal, rtol=1e-5)
        np.testing.assert_allclose(jnp.exp(logq[0, 1, 1]), 1.0)
        # whole-step log-probs sum to one over every z_s
        total = sum(
            jnp.exp(masked.transition_log_prob(lp, xt, jnp.asarray([z]), t, s, sched))[0]
            for z in ZS
        )
        np.testing.assert_allclose(total, 1.0, rtol=1e-5)

    def test_revealed_log_prob(self):
        logits = jax.random.normal(jax.random.key(1), (1, L, V + 1))
        xt, zs = jnp.array([[V, 1, V]]), jnp.array([[0, 1, V]])
        lp = masked.subs_log_probs(logits, xt)
        np.testing.assert_allclose(masked.revealed_log_prob(lp, xt, zs), lp[0, 0, 0], rtol=1e-6)
