"""Tests for didistill.divergences.alignment: f-DPO, f-DPG, DPH-RL and the direction mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from didistill.divergences import alignment, f_divergences
from didistill.divergences.categorical import categorical

FAST = settings(max_examples=20, deadline=None, derandomize=True)
LOG_U = np.linspace(-6.0, 6.0, 121)  # log(pi / ref)
ALL = [(n, {"alpha": 0.3} if n == "alpha" else {}) for n in f_divergences.names()]
ALL_IDS = [n for n, _ in ALL]


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# The papers' generators, written as published, in u = pi / ref (model on top).
def _paper_reverse_kl(u):
    return u * np.log(u)


def _paper_forward_kl(u):
    return -np.log(u)


def _paper_js(u):  # 2x JSD
    return u * np.log(u) - (u + 1) * np.log((u + 1) / 2)


def _paper_alpha(u, a):
    return (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))


class TestDirectionMapping:
    """f_paper(u) = u f(1/u) with log_r = log ref - log pi = -log u (module docstring)."""

    @pytest.mark.parametrize(
        "name,params,paper,scale",
        [
            ("reverse_kl", {}, _paper_reverse_kl, 1.0),
            ("forward_kl", {}, _paper_forward_kl, 1.0),
            ("jensen_shannon", {}, _paper_js, 2.0),
            ("alpha", {"alpha": 0.3}, lambda u: _paper_alpha(u, 0.3), 1.0),
            ("alpha", {"alpha": 0.7}, lambda u: _paper_alpha(u, 0.7), 1.0),
        ],
    )
    def test_paper_generator_is_the_dual(self, name, params, paper, scale):
        u = np.exp(LOG_U)
        library = f_divergences.get(name, **params).f(-LOG_U)  # f(r), r = 1/u
        np.testing.assert_allclose(paper(u), scale * u * library, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    def test_dual_derivative(self, name, params):
        fdiv = f_divergences.get(name, **params)
        log_r = jnp.asarray(LOG_U[LOG_U != 0.0])
        phi = alignment.dual_derivative(log_r, name, **params)
        generic = fdiv.f(log_r) - jnp.exp(log_r) * fdiv.f_prime(log_r)
        np.testing.assert_allclose(phi, generic, rtol=1e-9, atol=1e-9)
        # phi is the derivative of the dual generator g(u) = u f(1/u) at u = 1/r
        dual = lambda log_u: jnp.exp(log_u) * fdiv.f(-log_u)
        dual_prime = jax.vmap(jax.grad(dual))(-log_r) * jnp.exp(log_r)  # dg/du = dg/dlog u / u
        np.testing.assert_allclose(phi, dual_prime, rtol=1e-9, atol=1e-9)
        if fdiv.has_weight:  # d phi / d log r = -h(r)
            slope = jax.vmap(jax.grad(lambda l: alignment.dual_derivative(l, name, **params)))
            np.testing.assert_allclose(slope(log_r), -fdiv.weight(log_r), rtol=1e-9)

    def test_closed_forms_stay_finite(self):
        log_r = jnp.asarray([-50.0, 50.0], jnp.float32)
        for name, params in ALL:
            if name == "pearson_chi2":
                continue  # 1 - r^2 overflows to -inf at r = e^50, its true value
            assert np.all(np.isfinite(alignment.dual_derivative(log_r, name, **params))), name


class TestFdpo:
    @FAST
    @given(seed=st.integers(0, 2**31 - 1), beta=st.sampled_from([0.1, 0.3, 1.0]))
    def test_reverse_kl_is_dpo_exactly(self, seed, beta):
        rng = np.random.default_rng(seed)
        pw, pl, rw, rl = (jnp.asarray(rng.normal(-20.0, 5.0, size=8)) for _ in range(4))
        dpo = -jax.nn.log_sigmoid(beta * ((pw - rw) - (pl - rl)))
        got = alignment.fdpo_loss(pw, pl, rw, rl, divergence="reverse_kl", beta=beta)
        np.testing.assert_array_equal(got, dpo)

    @pytest.mark.parametrize(
        "name,params,paper_psi,paper_beta_factor",
        [
            ("reverse_kl", {}, np.log, 1.0),
            ("forward_kl", {}, lambda u: -1.0 / u, 1.0),
            ("jensen_shannon", {}, lambda u: np.log(2 * u / (1 + u)), 0.5),
            ("alpha", {"alpha": 0.5}, lambda u: -(u**-0.5) / 0.5, 1.0),
            ("alpha", {"alpha": 0.3}, lambda u: -(u**-0.3) / 0.3, 1.0),
        ],
    )
    def test_psi_and_loss_against_paper(self, name, params, paper_psi, paper_beta_factor):
        u = np.exp(LOG_U)
        psi = alignment.fdpo_psi(-LOG_U, name, **params)
        offset = paper_beta_factor * paper_psi(u) - psi  # a constant
        np.testing.assert_allclose(offset, offset[0], atol=1e-10)
        rng = np.random.default_rng(0)
        pw, pl, rw, rl = rng.normal(-10.0, 2.0, size=(4, 16))
        beta = 0.1
        paper = -jax.nn.log_sigmoid(
            beta * paper_beta_factor * (paper_psi(np.exp(pw - rw)) - paper_psi(np.exp(pl - rl)))
        )
        got = alignment.fdpo_loss(pw, pl, rw, rl, divergence=name, beta=beta, **params)
        np.testing.assert_allclose(got, paper, rtol=1e-10)

    def test_alpha_limits(self):
        u = np.exp(LOG_U)
        near_zero = alignment.fdpo_psi(-LOG_U, "alpha", alpha=1e-7)
        np.testing.assert_allclose(near_zero, LOG_U, atol=1e-5)  # reverse KL: log u
        near_one = alignment.fdpo_psi(-LOG_U, "alpha", alpha=1 - 1e-7)
        np.testing.assert_allclose(near_one, 1 - 1 / u, rtol=1e-5, atol=1e-5)  # forward KL

    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    def test_monotone_in_chosen_and_rejected(self, name, params):
        # psi = f_paper' is non-decreasing (f_paper convex): raising log pi(y_w) never raises
        # the loss, raising log pi(y_l) never lowers it.
        rng = np.random.default_rng(1)
        pw, pl, rw, rl = rng.normal(-5.0, 1.0, size=(4, 32))
        loss = lambda pw, pl: alignment.fdpo_loss(pw, pl, rw, rl, divergence=name, **params)
        base = loss(pw, pl)
        assert np.all(loss(pw + 0.5, pl) <= base + 1e-12)
        assert np.all(loss(pw, pl + 0.5) >= base - 1e-12)


def _categorical_problem(seed, k=6):
    rng = np.random.default_rng(seed)
    theta = jnp.asarray(rng.normal(size=k))
    target_logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=k)))
    proposal_logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=k)))
    return theta, target_logp, proposal_logp


class TestFdpg:
    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    def test_unbiased_by_enumeration(self, name, params):
        theta, target_logp, proposal_logp = _categorical_problem(3)
        fdiv = f_divergences.get(name, **params)

        def exact(theta):  # D_f(p || pi_theta) = sum_x pi f(p / pi)
            logp = jax.nn.log_softmax(theta)
            return jnp.sum(jnp.exp(logp) * fdiv.f(target_logp - logp))

        def expected_surrogate(theta, sampler_logp, off_policy=False, baseline=0.0):
            # E_{x ~ sampler}[loss on the single sample x], enumerated exactly
            logp = jax.nn.log_softmax(theta)

            def one_sample(lp, tp, sp):
                return alignment.fdpg_loss(
                    lp[None],
                    tp[None],
                    divergence=name,
                    proposal_logps=sp[None] if off_policy else None,
                    baseline=baseline,
                    **params,
                )

            per_sample = jax.vmap(one_sample)(logp, target_logp, sampler_logp)  # [K]
            return jnp.sum(jax.lax.stop_gradient(jnp.exp(sampler_logp)) * per_sample)

        def on_policy(theta, baseline=0.0):
            own = jax.lax.stop_gradient(jax.nn.log_softmax(theta))
            return expected_surrogate(theta, own, baseline=baseline)

        exact_grad = jax.grad(exact)(theta)
        np.testing.assert_allclose(jax.grad(on_policy)(theta), exact_grad, rtol=1e-9, atol=1e-12)
        with_baseline = jax.grad(lambda t: on_policy(t, baseline=0.7))(theta)
        np.testing.assert_allclose(with_baseline, exact_grad, rtol=1e-9, atol=1e-12)
        off_policy = jax.grad(lambda t: expected_surrogate(t, proposal_logp, True, 0.7))(theta)
        np.testing.assert_allclose(off_policy, exact_grad, rtol=1e-9, atol=1e-12)

    def test_pseudo_rewards(self):
        log_r = jnp.asarray(LOG_U)
        np.testing.assert_allclose(
            alignment.fdpg_pseudo_reward(log_r, "forward_kl"), np.exp(LOG_U), rtol=1e-12
        )
        np.testing.assert_allclose(
            alignment.fdpg_pseudo_reward(log_r, "reverse_kl"), LOG_U - 1.0, atol=1e-12
        )

    def test_monte_carlo_matches_exact_gradient(self):
        theta, target_logp, _ = _categorical_problem(4)
        samples = jax.random.categorical(jax.random.key(0), theta, shape=(200_000,))

        def surrogate(theta):
            logp = jax.nn.log_softmax(theta)[samples]
            return alignment.fdpg_loss(logp, target_logp[samples], divergence="jensen_shannon")

        def exact(theta):
            return categorical("jensen_shannon", target_logp, theta)

        np.testing.assert_allclose(jax.grad(surrogate)(theta), jax.grad(exact)(theta), atol=3e-3)


def _two_token_policy(seed, vocab=4):
    """Logits of an autoregressive policy over 2-token responses: first token, then per prefix."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=vocab)), jnp.asarray(rng.normal(size=(vocab, vocab)))


def _token_logps(policy, y1, y2):
    first, second = policy
    return jnp.stack(
        [jax.nn.log_softmax(first)[y1], jax.nn.log_softmax(second, axis=-1)[y1, y2]], axis=-1
    )


class TestDph:
    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    def test_single_token_expectation(self, name, params):
        rng = np.random.default_rng(5)
        init_logits, policy_logits = rng.normal(size=5), rng.normal(size=5)

        def expected(policy_logits):  # E_{y ~ pi_0}[penalty(y)], enumerated
            init_logp = jax.nn.log_softmax(init_logits)
            terms = alignment.dph_penalty(
                jax.nn.log_softmax(policy_logits)[:, None],
                init_logp[:, None],
                divergence=name,
                **params,
            )
            return jnp.sum(jnp.exp(init_logp) * terms)

        exact = lambda pl: categorical(name, init_logits, pl, **params)  # D_f(pi_0 || pi)
        np.testing.assert_allclose(expected(policy_logits), exact(policy_logits), rtol=1e-10)
        np.testing.assert_allclose(
            jax.grad(expected)(policy_logits), jax.grad(exact)(policy_logits), atol=1e-10
        )

    @pytest.mark.parametrize("name,params", [ALL[1], ALL[2], ALL[-1]])
    def test_two_token_expectation(self, name, params):
        initial, policy = _two_token_policy(6), _two_token_policy(7)
        y1, y2 = jnp.meshgrid(jnp.arange(4), jnp.arange(4), indexing="ij")
        y1, y2 = y1.ravel(), y2.ravel()  # all 16 responses
        init_logps = _token_logps(initial, y1, y2)  # [16, 2]
        penalty = alignment.dph_penalty(
            _token_logps(policy, y1, y2), init_logps, divergence=name, **params
        )
        expected = jnp.sum(jnp.exp(init_logps.sum(-1)) * penalty)
        # sum over positions of E_{prefix ~ pi_0}[D_f(pi_0(.|prefix) || pi(.|prefix))]
        first = categorical(name, initial[0], policy[0], **params)
        second = categorical(name, initial[1], policy[1], **params)  # [4], one per prefix
        exact = first + jnp.sum(jax.nn.softmax(initial[0]) * second)
        np.testing.assert_allclose(expected, exact, rtol=1e-10)

    @FAST
    @given(seed=st.integers(0, 2**31 - 1))
    def test_published_generators_and_nonnegativity(self, seed):
        rng = np.random.default_rng(seed)
        policy, initial = rng.normal(-3.0, 2.0, size=(2, 4, 7))
        u = np.exp(policy - initial)
        terms = lambda name, **kw: alignment.dph_penalty_terms(
            policy, initial, divergence=name, **kw
        )
        np.testing.assert_allclose(terms("forward_kl"), u - 1 - np.log(u), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(terms("jensen_shannon"), _paper_js(u) / 2, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            terms("alpha", alpha=0.2), _paper_alpha(u, 0.2), rtol=1e-9, atol=1e-12
        )
        for name, params in ALL:
            assert np.all(np.asarray(terms(name, **params)) >= -1e-12), name

    def test_mask_clip_and_zero_at_equality(self):
        logps = jnp.asarray([[-1.0, -2.0, -3.0]])
        np.testing.assert_allclose(alignment.dph_penalty(logps, logps), [0.0], atol=1e-15)
        policy = jnp.asarray([[-1.0, -40.0, -3.0]])
        mask = jnp.asarray([[1, 0, 1]])
        masked = alignment.dph_penalty(policy, logps, mask=mask)
        np.testing.assert_allclose(masked, [0.0], atol=1e-15)
        clipped = alignment.dph_penalty_terms(policy, logps)[0, 1]  # log_r = 38 clipped to 20
        np.testing.assert_allclose(clipped, np.exp(-20.0) - 1 + 20.0, rtol=1e-12)
        unclipped = alignment.dph_penalty_terms(policy, logps, log_ratio_clip=None)[0, 1]
        np.testing.assert_allclose(unclipped, np.exp(-38.0) - 1 + 38.0, rtol=1e-12)
