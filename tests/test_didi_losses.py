"""DiDi-Instruct losses: the policy-gradient estimator is exact in expectation (by enumeration),
grouped normalisation's properties (hypothesis), the discriminator's optimum, regularisers."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from didistill.diffusion import masked
from didistill.distill.discrete import didi_losses as dl


class TestPolicyGradientLoss:
    def test_expectation_is_gradient_of_expected_reward(self):
        """Categorical policy over 5 outcomes: E_x~q[grad L_pg] = -grad E_q[r] exactly."""
        rewards = jnp.array([0.3, -1.2, 2.0, 0.0, 0.7])
        logits = jnp.array([0.1, -0.4, 0.9, 0.2, -1.0])

        def expected_surrogate(nu):  # sum_x sg(q(x)) * L_pg(x), the estimator's expectation
            log_q = jax.nn.log_softmax(nu)  # [5]
            prob = jax.lax.stop_gradient(jnp.exp(log_q))
            n = rewards.shape[0]
            return dl.policy_gradient_loss(rewards, log_q, n * prob)

        objective = lambda nu: jnp.sum(jax.nn.softmax(nu) * rewards)
        np.testing.assert_allclose(
            jax.grad(expected_surrogate)(logits), -jax.grad(objective)(logits), atol=1e-6
        )

    def test_expectation_is_gradient_of_integral_kl(self):
        """L = 2 tokens, V = 2: exact noised marginals by enumeration; with reward
        log q_theta - log q_nu and weight omega/pi, E[grad L_pg] = grad sum_t omega KL_t."""
        schedule = masked.LogLinearSchedule(eps=0.0)
        xs = list(itertools.product(range(2), repeat=2))  # 4 clean sequences
        zs = list(itertools.product(range(3), repeat=2))  # 9 noised ones, 2 = [MASK]
        ts = jnp.array([0.3, 0.6, 0.9])
        pi = jnp.array([0.5, 0.3, 0.2])  # proposal over times
        omega = schedule.loss_weight(ts)  # the ELBO weight 1/t

        def corrupt(t):  # Q_t(z | x) [9, 4]
            a = float(schedule.alpha(t))
            tok = lambda zl, xl: a if zl == xl else (1 - a if zl == 2 else 0.0)
            return jnp.array([[tok(z[0], x[0]) * tok(z[1], x[1]) for x in xs] for z in zs])

        Q = jnp.stack([corrupt(t) for t in ts])  # [3, 9, 4]
        p_teacher = jnp.array([0.4, 0.1, 0.2, 0.3])
        nu0 = jnp.array([0.5, -0.3, 0.0, 0.8])

        def ikl(nu):
            q_s, q_t = Q @ jax.nn.softmax(nu), Q @ p_teacher  # [3, 9]
            kl = jnp.sum(jnp.where(q_s > 0, q_s * (jnp.log(q_s) - jnp.log(q_t)), 0.0), -1)
            return jnp.sum(omega * kl)

        def expected_surrogate(nu):
            log_p = jax.nn.log_softmax(nu)  # [4]
            q_s, q_t = Q @ jnp.exp(log_p), Q @ p_teacher  # [3, 9]
            reward = jnp.where(q_s > 0, jnp.log(q_t) - jnp.log(q_s), 0.0)  # [3, 9]
            prob = pi[:, None, None] * Q * jnp.exp(log_p)[None, None, :]  # P(t, z, x) [3, 9, 4]
            adv = jnp.broadcast_to(reward[..., None], prob.shape).ravel()
            log_q = jnp.broadcast_to(log_p, prob.shape).ravel()
            w = jnp.broadcast_to((omega / pi)[:, None, None], prob.shape).ravel()
            weight = adv.size * w * jax.lax.stop_gradient(prob.ravel())
            return dl.policy_gradient_loss(jax.lax.stop_gradient(adv), log_q, weight)

        np.testing.assert_allclose(
            jax.grad(expected_surrogate)(nu0), jax.grad(ikl)(nu0), rtol=1e-4, atol=1e-6
        )

    def test_student_loss_combines_regularisers(self):
        assert float(dl.student_loss(1.0, 2.0, 3.0, 0.5, 0.1)) == pytest.approx(1.7)
        assert float(dl.student_loss(1.0, 2.0, 3.0)) == 1.0


finite = st.floats(-100, 100, allow_nan=False, width=32)


def _spread_groups(values, group_size):
    groups = values.reshape(-1, group_size)
    return bool(np.all(np.std(groups, axis=1) > 1e-2))


class TestGroupedNormalize:
    @settings(max_examples=50, deadline=None)
    @given(st.integers(2, 5), st.integers(1, 4), st.data())
    def test_zero_mean_unit_std_per_group(self, group_size, num_groups, data):
        values = data.draw(hnp.arrays(np.float32, group_size * num_groups, elements=finite))
        adv = np.asarray(dl.grouped_normalize(jnp.asarray(values), group_size, clip=0.0))
        groups = adv.reshape(num_groups, group_size)
        np.testing.assert_allclose(groups.mean(1), 0.0, atol=1e-4)
        spread = np.std(values.reshape(num_groups, group_size), axis=1) > 1e-2
        np.testing.assert_allclose(groups.std(1, ddof=1)[spread], 1.0, rtol=1e-3)  # torch.std

    @settings(max_examples=50, deadline=None)
    @given(st.integers(2, 6), st.floats(0.5, 3.0), st.data())
    def test_clipping_bounds_advantages(self, group_size, clip, data):
        values = data.draw(hnp.arrays(np.float32, 2 * group_size, elements=finite))
        adv = np.asarray(dl.grouped_normalize(jnp.asarray(values), group_size, clip=clip))
        assert np.all(np.abs(adv) <= clip + 1e-6)

    @settings(max_examples=50, deadline=None)
    @given(st.integers(2, 5), st.data())
    def test_invariant_to_per_group_shifts(self, group_size, data):
        values = data.draw(hnp.arrays(np.float32, 3 * group_size, elements=finite))
        shifts = data.draw(hnp.arrays(np.float32, 3, elements=st.floats(-50, 50, width=32)))
        shifted = values + np.repeat(shifts, group_size)
        a = dl.grouped_normalize(jnp.asarray(values), group_size, clip=3.0)
        b = dl.grouped_normalize(jnp.asarray(shifted), group_size, clip=3.0)
        if _spread_groups(values, group_size):
            np.testing.assert_allclose(a, b, atol=2e-3)

    def test_equal_rewards_give_zero(self):
        np.testing.assert_array_equal(dl.grouped_normalize(jnp.ones(8), 4, 3.0), 0.0)

    def test_bad_group_sizes_are_clear_errors(self):
        with pytest.raises(ValueError, match="multiple of config.distill.group_size"):
            dl.grouped_normalize(jnp.zeros(6), 4)
        with pytest.raises(ValueError, match="G >= 2"):
            dl.grouped_normalize(jnp.zeros(6), 1)


class TestDiscriminator:
    @pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
    def test_optimal_logit_minimises_expected_loss(self, smoothing):
        """E_z~p BCE(d(z), 1 - s) + E_z~q BCE(d(z), s) is stationary at `optimal_logit`."""
        p = jnp.array([0.5, 0.2, 0.2, 0.1])
        q = jnp.array([0.1, 0.3, 0.3, 0.3])
        yes, no = jnp.ones((1, 1), bool), jnp.zeros((1, 1), bool)

        def expected(d):
            one = lambda di, real: dl.discriminator_loss(
                di[None, None], di[None, None], yes if real else no, no if real else yes,
                smoothing,
            )  # fmt: skip
            real = jax.vmap(lambda di: one(di, True))(d)
            fake = jax.vmap(lambda di: one(di, False))(d)
            return jnp.sum(p * real + q * fake)

        d_star = dl.optimal_logit(jnp.log(p), jnp.log(q), smoothing)
        np.testing.assert_allclose(jax.grad(expected)(d_star), 0.0, atol=1e-6)
        if smoothing == 0.0:
            np.testing.assert_allclose(d_star, jnp.log(p / q), rtol=1e-5)
        else:
            assert np.all(np.abs(d_star) < np.log((1 - smoothing) / smoothing))

    def test_loss_uses_only_masked_positions(self):
        real, fake = jnp.array([[0.0, 50.0]]), jnp.array([[0.0, -50.0]])
        mask = jnp.array([[True, False]])
        expected = float(jnp.log(2.0))  # only the logit-0 positions count
        assert float(dl.discriminator_loss(real, fake, mask, mask, 0.0)) == pytest.approx(
            expected, rel=1e-6
        )

    def test_sequence_reward_is_clipped_masked_mean(self):
        logits = jnp.array([[1.0, 3.0, 20.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
        mask = jnp.array([[True, True, True, False], [False] * 4])
        reward = dl.sequence_reward(logits, mask, clip=8.0)
        np.testing.assert_allclose(reward, [(1 + 3 + 8) / 3, 0.0], rtol=1e-6)


class TestRegularisers:
    def test_kl_and_entropy_match_numpy_on_masked_positions(self):
        rng = np.random.default_rng(0)
        s_logits = rng.normal(size=(2, 3, 5)).astype(np.float32)  # V = 4 plus [MASK]
        t_logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
        mask = np.array([[True, False, True], [False, False, True]])

        def softmax(x):
            e = np.exp(x[..., :-1] - x[..., :-1].max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        ps, pt = softmax(s_logits), softmax(t_logits)
        kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)[mask].mean()
        ent = (-(ps * np.log(ps)).sum(-1))[mask].mean()
        np.testing.assert_allclose(dl.kl_to_teacher(s_logits, t_logits, mask), kl, rtol=1e-5)
        np.testing.assert_allclose(dl.entropy(s_logits, mask), ent, rtol=1e-5)
        assert float(dl.kl_to_teacher(t_logits, t_logits, mask)) == pytest.approx(0, abs=1e-6)

    def test_time_weight(self):
        schedule = masked.LogLinearSchedule(eps=0.0)
        t = jnp.array([0.01, 0.5, 1.0])
        np.testing.assert_allclose(dl.time_weight(schedule, t, "elbo"), [10.0, 2.0, 1.0])
        np.testing.assert_allclose(dl.time_weight(schedule, t, "none"), 1.0)
        with pytest.raises(ValueError, match="time weight"):
            dl.time_weight(schedule, t, "bogus")
