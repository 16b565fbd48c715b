"""Tests for didistill.divergences.transport: Sinkhorn via ott-jax against POT, and SinKD."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from didistill.divergences import transport

SLOW = settings(max_examples=8, deadline=None, derandomize=True)
_sinkd = jax.jit(transport.sinkd_loss, static_argnames=("num_iterations",))
_sinkd_grads = jax.jit(jax.grad(transport.sinkd_loss, argnums=(0, 1)))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _problem(seed, n=6, m=5):
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0.0, 1.0, size=(n, m))
    a = rng.dirichlet(np.ones(n))
    b = rng.dirichlet(np.ones(m))
    return cost, a, b


@functools.partial(jax.jit, static_argnames=("differentiation",))
def _tight(cost, a, b, epsilon, differentiation="implicit"):
    return transport.sinkhorn(
        cost,
        a,
        b,
        epsilon=epsilon,
        threshold=1e-11,
        max_iterations=20000,
        differentiation=differentiation,
    )


def _published_sinkd_numpy(z, v, temperature=2.0, epsilon=0.1, iterations=20):
    """SinKD's loop written in kernel space, as in the authors' description."""
    s = np.exp(z / temperature)
    s /= s.sum(-1, keepdims=True)
    t = np.exp(v / temperature)
    t /= t.sum(-1, keepdims=True)
    cost = np.abs(s[:, None, :] - t[None, :, :]).sum(-1)
    plan = np.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdims=True)
        plan = plan / plan.sum(0, keepdims=True)
    return np.sum(plan * cost), cost


class TestSinkhorn:
    @pytest.mark.parametrize("c,eps", [(1.0, 1.0), (2.0, 0.5), (0.3, 0.1)])
    def test_two_point_closed_form(self, x64, c, eps):
        # a = b = (1/2, 1/2), C = [[0, c], [c, 0]]: <P, C> = c / (1 + exp(c / eps)).
        cost = jnp.array([[0.0, c], [c, 0.0]])
        half = jnp.full((2,), 0.5)
        out = _tight(cost, half, half, eps)
        np.testing.assert_allclose(out.transport_cost, c / (1.0 + np.exp(c / eps)), rtol=1e-9)
        assert bool(out.converged)

    @SLOW
    @given(seed=st.integers(0, 2**31 - 1), eps=st.sampled_from([0.05, 0.2, 1.0, 3.0]))
    def test_matches_pot(self, seed, eps):
        with jax.enable_x64(True):
            cost, a, b = _problem(seed)
            out = _tight(jnp.asarray(cost), jnp.asarray(a), jnp.asarray(b), eps)
            pot_cost = ot.sinkhorn2(
                a, b, cost, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100000
            )
            pot_plan = ot.sinkhorn(
                a, b, cost, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100000
            )
            np.testing.assert_allclose(out.transport_cost, pot_cost, rtol=1e-7)
            np.testing.assert_allclose(out.plan, pot_plan, atol=1e-8)
            # the entropic objective is <P, C> + eps KL(P || a b^T)
            plan = np.asarray(out.plan)
            kl = np.sum(plan * np.log(plan / np.outer(a, b)))
            np.testing.assert_allclose(out.entropic_cost, pot_cost + eps * kl, rtol=1e-7)

    def test_marginals_and_points_match_cost_matrix(self, x64):
        rng = np.random.default_rng(0)
        x = rng.dirichlet(np.ones(4), size=7)  # a batch of 7 distributions over 4 classes
        y = rng.dirichlet(np.ones(4), size=5)
        l1 = np.abs(x[:, None] - y[None]).sum(-1)
        points = transport.sinkhorn_points(
            x, y, epsilon=0.05, cost="l1", threshold=1e-10, max_iterations=20000
        )
        dense = transport.sinkhorn(l1, epsilon=0.05, threshold=1e-10, max_iterations=20000)
        np.testing.assert_allclose(points.transport_cost, dense.transport_cost, rtol=1e-8)
        np.testing.assert_allclose(points.plan.sum(1), np.full(7, 1 / 7), atol=1e-9)
        np.testing.assert_allclose(points.plan.sum(0), np.full(5, 1 / 5), atol=1e-9)

    def test_fixed_iterations_and_convergence(self, x64):
        cost, a, b = _problem(1)
        run = jax.jit(
            lambda n: transport.sinkhorn(cost, a, b, epsilon=0.05, num_iterations=n),
            static_argnums=0,
        )
        few, many = run(3), run(3000)
        assert int(few.num_iterations) == 3 and int(many.num_iterations) == 3000
        pot_cost = ot.sinkhorn2(a, b, cost, 0.05, method="sinkhorn_log", stopThr=1e-13)
        np.testing.assert_allclose(many.transport_cost, pot_cost, rtol=1e-8)
        assert abs(float(few.transport_cost) - pot_cost) > 1e-6

    def test_gradients_implicit_unrolled_and_finite_differences(self, x64):
        rng = np.random.default_rng(2)
        x = rng.normal(size=(6, 3))
        y = rng.normal(size=(5, 3))
        direction = rng.normal(size=x.shape)

        @functools.partial(jax.jit, static_argnums=1)
        def value(x, differentiation):
            return transport.sinkhorn_points(
                x,
                y,
                epsilon=0.5,
                threshold=1e-10,
                max_iterations=5000,
                differentiation=differentiation,
            ).transport_cost

        grads = {
            d: jax.jit(jax.grad(functools.partial(value, differentiation=d)))(x)
            for d in ("implicit", "unrolled")
        }
        for g in grads.values():
            assert np.all(np.isfinite(g))
        np.testing.assert_allclose(grads["implicit"], grads["unrolled"], rtol=1e-5, atol=1e-7)
        h = 1e-5
        fd = (value(x + h * direction, "implicit") - value(x - h * direction, "implicit")) / (2 * h)
        np.testing.assert_allclose(np.sum(grads["implicit"] * direction), fd, rtol=1e-5)

    def test_entropic_cost_gradient_is_the_plan(self, x64):
        # Envelope theorem: d/dC min_P <P, C> + eps KL(P || a b^T) = P*.
        cost, a, b = _problem(3)
        grad = jax.grad(lambda c: _tight(c, a, b, 0.2).entropic_cost)(cost)
        np.testing.assert_allclose(grad, _tight(cost, a, b, 0.2).plan, atol=1e-8)

    def test_float32_jit_vmap(self):
        rng = np.random.default_rng(4)
        costs = jnp.asarray(rng.uniform(size=(3, 6, 5)), jnp.float32)
        one = lambda c: transport.sinkhorn(c, epsilon=0.1).transport_cost  # noqa: E731
        solve = jax.jit(jax.vmap(one))
        batched = solve(costs)
        assert batched.shape == (3,) and batched.dtype == jnp.float32
        single = jax.jit(one)
        for i in range(3):
            np.testing.assert_allclose(batched[i], single(costs[i]), rtol=1e-5)
        grad = jax.jit(jax.grad(lambda c: solve(c).sum()))(costs)
        assert np.all(np.isfinite(grad))

    def test_bad_arguments(self):
        cost = jnp.ones((2, 2))
        with pytest.raises(ValueError, match="differentiation"):
            transport.sinkhorn(cost, epsilon=1.0, differentiation="backprop")
        with pytest.raises(ValueError, match="num_iterations"):
            transport.sinkhorn(cost, epsilon=1.0, num_iterations=0)
        with pytest.raises(ValueError, match="Unknown cost"):
            transport.sinkhorn_points(cost, cost, epsilon=1.0, cost="l3")


class TestSinkd:
    def test_matches_published_loop(self, x64):
        rng = np.random.default_rng(5)
        z, v = 3 * rng.normal(size=(8, 10)), 3 * rng.normal(size=(8, 10))
        expected, cost = _published_sinkd_numpy(z, v)
        np.testing.assert_allclose(transport.sinkd_cost_matrix(z, v), cost, rtol=1e-12)
        np.testing.assert_allclose(transport.sinkd_loss(z, v), expected, rtol=1e-10)

    def test_converged_value_is_batch_times_ot_cost(self, x64):
        rng = np.random.default_rng(6)
        z, v = 2 * rng.normal(size=(6, 5)), 2 * rng.normal(size=(6, 5))
        cost = np.asarray(transport.sinkd_cost_matrix(z, v))
        uniform = np.full(6, 1 / 6)
        pot_cost = ot.sinkhorn2(uniform, uniform, cost, 0.1, method="sinkhorn_log", stopThr=1e-13)
        converged = transport.sinkd_loss(z, v, num_iterations=3000)
        np.testing.assert_allclose(converged, 6 * pot_cost, rtol=1e-8)

    def test_plan_marginals(self, x64):
        rng = np.random.default_rng(7)
        plan = transport.sinkd_plan(jnp.asarray(rng.uniform(0, 2, size=(5, 5))), num_iterations=3)
        np.testing.assert_allclose(plan.sum(0), np.ones(5), atol=1e-12)  # last pass: columns
        plan = transport.sinkd_plan(jnp.asarray(rng.uniform(0, 2, size=(5, 5))), num_iterations=500)
        np.testing.assert_allclose(plan.sum(1), np.ones(5), atol=1e-9)

    @settings(max_examples=15, deadline=None, derandomize=True)
    @given(seed=st.integers(0, 2**31 - 1))
    def test_properties(self, seed):
        rng = np.random.default_rng(seed)
        z = jnp.asarray(3 * rng.normal(size=(6, 4)), jnp.float32)
        v = jnp.asarray(3 * rng.normal(size=(6, 4)), jnp.float32)
        loss = _sinkd(z, v)
        assert float(loss) >= 0.0
        # Row and column normalisations are permutation equivariant, so reordering either
        # batch leaves the loss unchanged at any iteration count.
        perm = rng.permutation(6)
        np.testing.assert_allclose(_sinkd(z, v[perm]), loss, rtol=2e-5)
        np.testing.assert_allclose(_sinkd(z[perm], v), loss, rtol=2e-5)
        # Infinite temperature: every softmax is uniform, the cost is 0.
        np.testing.assert_allclose(_sinkd(z, v, temperature=1e8), 0.0, atol=1e-6)
        grads = _sinkd_grads(z, z)  # |s - t| = 0 on the diagonal
        assert all(np.all(np.isfinite(g)) for g in grads)

    def test_identical_batches_cost_less(self):
        rng = np.random.default_rng(8)
        z = 4 * rng.normal(size=(8, 10))
        v = 4 * rng.normal(size=(8, 10))
        assert _sinkd(z, z) < _sinkd(z, v)

    def test_leading_axes_and_gradient(self, x64):
        rng = np.random.default_rng(9)
        z, v = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
        batched = jax.jit(transport.sinkd_loss)(z, v)
        assert batched.shape == (3,)
        for i in range(3):
            np.testing.assert_allclose(batched[i], transport.sinkd_loss(z[i], v[i]), rtol=1e-12)
        check_grads(
            jax.jit(lambda z: transport.sinkd_loss(z, v[0])), (z[0],), order=1, modes=("rev",)
        )
