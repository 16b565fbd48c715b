"""Categorical (logit) divergences against scipy, closed forms and their defining identities;
the generic f-divergence fallback against the closed forms; registering a new f-divergence."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, rel_entr

from didistill.divergences import categorical, categorical_names, f_divergences, get, names
from didistill.divergences.categorical import (
    KD_NAMES,
    categorical_from_log_probs,
    categorical_generic,
)

SHAPE = (3, 6)  # [batch, vocabulary]
SETTINGS = settings(max_examples=25, deadline=None)
F_CASES = [(n, {}) for n in names() if n != "alpha"] + [
    ("alpha", {"alpha": a}) for a in (-1.0, 0.5, 2.0)
]
KD_CASES = [
    ("skew_kl", {}),
    ("skew_kl", {"alpha": 0.3}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("generalized_jsd", {}),
    ("generalized_jsd", {"beta": 0.1}),
    ("alpha_beta", {"alpha": 0.2, "beta": 0.7}),
    ("alpha_beta", {"alpha": 0.8, "beta": 0.3}),
]
ALL_CASES = F_CASES + KD_CASES
ALL_IDS = [f"{n}{''.join(f'-{k}{v}' for k, v in p.items())}" for n, p in ALL_CASES]
SYMMETRIC = ["jensen_shannon", "squared_hellinger", "jeffreys", "total_variation"]


def logit_arrays(lo=-8.0, hi=8.0):
    return hnp.arrays(np.float64, SHAPE, elements=st.floats(lo, hi))


def generator(name, r, alpha=None):
    """f(r) of the registry's table (`didistill.divergences.f_divergences`), NumPy float64."""
    return {
        "reverse_kl": lambda: -np.log(r),
        "forward_kl": lambda: r * np.log(r),
        "jensen_shannon": lambda: 0.5 * (r * np.log(r) - (r + 1) * np.log((r + 1) / 2)),
        "squared_hellinger": lambda: 1 - np.sqrt(r),
        "jeffreys": lambda: (r - 1) * np.log(r),
        "pearson_chi2": lambda: (r - 1) ** 2,
        "neyman_chi2": lambda: (1 - r) ** 2 / r,
        "total_variation": lambda: 0.5 * np.abs(r - 1),
        "softened_reverse_kl": lambda: (r + 1) * np.log((r + 1) / (2 * r)),
        "alpha": lambda: (r**alpha - 1 - alpha * (r - 1)) / (alpha * (alpha - 1)),
    }[name]()


def entropy(p):
    return -np.sum(p * np.log(p), axis=-1)


def oracle(name, p, q, **params):
    """Float64 NumPy / scipy value of every divergence, reduced over the last axis."""
    if name in names():
        return np.sum(q * generator(name, p / q, params.get("alpha")), axis=-1)
    if name == "skew_kl":
        a = params.get("alpha", 0.1)
        return rel_entr(p, a * p + (1 - a) * q).sum(-1)
    if name == "skew_reverse_kl":
        a = params.get("alpha", 0.1)
        return rel_entr(q, a * q + (1 - a) * p).sum(-1)
    if name == "generalized_jsd":  # H(M) - beta H(P) - (1 - beta) H(Q), normalised
        b = params.get("beta", 0.5)
        jsd = entropy(b * p + (1 - b) * q) - b * entropy(p) - (1 - b) * entropy(q)
        return jsd / (b * (1 - b))
    a, b = params["alpha"], params["beta"]
    s = a + b
    terms = p**a * q**b - a / s * p**s - b / s * q**s
    return -np.sum(terms, axis=-1) / (a * b)


def probs(logits, temperature=1.0):
    return np.exp(log_softmax(np.asarray(logits, np.float64) / temperature, axis=-1))


def value64(name, p_logits, q_logits, **kwargs):
    with jax.enable_x64(True):
        return np.asarray(categorical(name, jnp.asarray(p_logits), jnp.asarray(q_logits), **kwargs))


@pytest.mark.parametrize("name,params", ALL_CASES, ids=ALL_IDS)
class TestAgainstOracles:
    @SETTINGS
    @given(p_logits=logit_arrays(), q_logits=logit_arrays())
    def test_matches_numpy_and_is_nonnegative(self, name, params, p_logits, q_logits):
        got = value64(name, p_logits, q_logits, **params)
        want = oracle(name, probs(p_logits), probs(q_logits), **params)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-11)
        got32 = categorical(name, jnp.asarray(p_logits, jnp.float32), q_logits, **params)
        assert got32.dtype == jnp.float32 and np.all(np.asarray(got32) >= -1e-5)
        np.testing.assert_allclose(got32, want, rtol=2e-3, atol=2e-5)

    def test_zero_when_equal_and_invariant_to_shifts_and_permutations(self, name, params):
        logits = np.random.default_rng(0).normal(size=SHAPE) * 3
        for q_logits in (logits, logits + 5.0):
            np.testing.assert_allclose(value64(name, logits, q_logits, **params), 0, atol=1e-12)
        other = np.random.default_rng(1).normal(size=SHAPE) * 3
        perm = np.random.default_rng(2).permutation(SHAPE[1])
        np.testing.assert_allclose(
            value64(name, logits[:, perm], other[:, perm], **params),
            value64(name, logits, other, **params),
            rtol=1e-12,
        )

    def test_masked_vocabulary_and_extreme_logits(self, name, params):
        """-inf logits (shared) drop out with finite gradients; +-1e4 logits stay finite."""
        rng = np.random.default_rng(3)
        p_logits, q_logits = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
        mask = np.zeros(SHAPE, bool)
        mask[:, 4:] = True
        masked = lambda x: jnp.asarray(np.where(mask, -np.inf, x), jnp.float32)
        value = categorical(name, masked(p_logits), masked(q_logits), **params)
        dropped = categorical(name, p_logits[:, :4], q_logits[:, :4], **params)
        np.testing.assert_allclose(value, dropped, rtol=1e-5, atol=1e-7)
        grad = jax.grad(lambda z: categorical(name, masked(p_logits), z, **params).sum())
        assert np.all(np.isfinite(grad(masked(q_logits))))
        big = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=SHAPE), jnp.float32)
        value = categorical(name, big, jnp.roll(big, 1, axis=-1), **params)
        assert not np.any(np.isnan(value))
        if name not in ("pearson_chi2", "neyman_chi2") and 0 < params.get("alpha", 0.5) < 1:
            assert np.all(np.isfinite(value))  # exact values here are <= ~2e4
        bf16 = categorical(name, p_logits.astype(jnp.bfloat16), q_logits, **params)
        assert bf16.dtype == jnp.float32
        want = categorical(name, p_logits, q_logits, **params)
        np.testing.assert_allclose(bf16, want, rtol=2e-2, atol=2e-2)  # bf16 logits: 3 digits


class TestScipyAndClosedForms:
    def test_kl_and_js_against_scipy(self):
        rng = np.random.default_rng(4)
        p_logits, q_logits = rng.normal(size=SHAPE) * 2, rng.normal(size=SHAPE) * 2
        p, q = probs(p_logits), probs(q_logits)
        check = lambda name, want: np.testing.assert_allclose(
            value64(name, p_logits, q_logits), want, rtol=1e-10
        )
        check("forward_kl", rel_entr(p, q).sum(-1))
        check("reverse_kl", rel_entr(q, p).sum(-1))
        check("jeffreys", rel_entr(p, q).sum(-1) + rel_entr(q, p).sum(-1))
        check("jensen_shannon", jensenshannon(p, q, axis=-1) ** 2)  # scipy returns the sqrt
        check("softened_reverse_kl", 2 * rel_entr((p + q) / 2, p).sum(-1))
        check("total_variation", 0.5 * np.abs(p - q).sum(-1))
        check("squared_hellinger", 1 - np.sqrt(p * q).sum(-1))

    def test_reference_values(self):
        bern = lambda a: np.log([a, 1 - a])  # logits of a Bernoulli
        js = value64("jensen_shannon", bern(0.2), bern(0.7))
        np.testing.assert_allclose(js, 0.13250545091704774, rtol=1e-12)
        gjsd = value64("generalized_jsd", bern(0.2), bern(0.7), beta=0.3)
        np.testing.assert_allclose(gjsd * 0.3 * 0.7, 0.11041307521370658, rtol=1e-12)
        # scipy's documented jensenshannon([1, 0], [.5, .5]) = 0.46450140402245893.
        one_hot = np.array([0.0, -np.inf])
        np.testing.assert_allclose(
            value64("jensen_shannon", one_hot, np.zeros(2)), 0.46450140402245893**2, rtol=1e-12
        )

    def test_disjoint_supports(self):
        p_logits = jnp.array([0.0, -jnp.inf, -jnp.inf])
        q_logits = jnp.array([-jnp.inf, 0.0, 0.0])
        get_value = lambda name: float(categorical(name, p_logits, q_logits))
        np.testing.assert_allclose(get_value("jensen_shannon"), np.log(2), rtol=1e-6)
        np.testing.assert_allclose(get_value("total_variation"), 1.0, rtol=1e-6)
        np.testing.assert_allclose(get_value("squared_hellinger"), 1.0, rtol=1e-6)
        assert get_value("forward_kl") == np.inf and get_value("reverse_kl") == np.inf
        for name in categorical_names():
            params = {"alpha": 0.5, "beta": 0.5} if name == "alpha_beta" else {}
            params = {"alpha": 0.5} if name == "alpha" else params
            assert not np.isnan(float(categorical(name, p_logits, q_logits, **params))), name


class TestSymmetryLimitsAndBounds:
    @SETTINGS
    @given(p_logits=logit_arrays(), q_logits=logit_arrays())
    def test_symmetric_divergences(self, p_logits, q_logits):
        for name, params in [(n, {}) for n in SYMMETRIC] + [("generalized_jsd", {"beta": 0.5})]:
            np.testing.assert_allclose(
                value64(name, p_logits, q_logits, **params),
                value64(name, q_logits, p_logits, **params),
                rtol=1e-9,
                atol=1e-12,
            )

    def test_asymmetric_divergences_are_not_symmetric(self):
        p_logits, q_logits = np.array([2.0, 0.0, -1.0]), np.array([0.0, 0.5, 0.0])
        for name, params in [("forward_kl", {}), ("generalized_jsd", {"beta": 0.1})]:
            forward = value64(name, p_logits, q_logits, **params)
            backward = value64(name, q_logits, p_logits, **params)
            assert abs(forward - backward) > 1e-3, name

    def test_generalized_jsd_endpoints_are_the_kl_limits(self):
        p_logits, q_logits = np.array([2.0, 0.0, -1.0]), np.array([0.0, 0.5, 0.0])
        gjsd = lambda beta: value64("generalized_jsd", p_logits, q_logits, beta=beta)
        forward, reverse = (
            value64("forward_kl", p_logits, q_logits),
            value64("reverse_kl", p_logits, q_logits),
        )
        np.testing.assert_allclose(gjsd(0.0), forward, rtol=1e-12)  # KL(teacher || student)
        np.testing.assert_allclose(gjsd(1.0), reverse, rtol=1e-12)  # KL(student || teacher)
        np.testing.assert_allclose(gjsd(1e-6), forward, rtol=1e-5)
        np.testing.assert_allclose(gjsd(1 - 1e-6), reverse, rtol=1e-5)
        for beta, limit in [(1e-6, forward), (1 - 1e-6, reverse)]:  # also in float32
            near = categorical("generalized_jsd", p_logits, q_logits, beta=beta)
            np.testing.assert_allclose(near, limit, rtol=1e-4)
        p, q = probs(p_logits), probs(q_logits)
        for beta in (0.1, 0.5, 0.9):  # JSD_beta <= binary entropy of beta
            raw = gjsd(beta) * beta * (1 - beta)
            assert raw <= -(beta * np.log(beta) + (1 - beta) * np.log(1 - beta))
        np.testing.assert_allclose(gjsd(0.5) / 4, value64("jensen_shannon", p_logits, q_logits))
        assert np.all(p > 0) and np.all(q > 0)

    def test_skew_bounds_and_endpoints(self):
        rng = np.random.default_rng(5)
        p_logits, q_logits = rng.normal(size=SHAPE) * 6, rng.normal(size=SHAPE) * 6
        for alpha in (0.1, 0.5):
            for name in ("skew_kl", "skew_reverse_kl"):
                assert np.all(value64(name, p_logits, q_logits, alpha=alpha) <= -np.log(alpha))
        np.testing.assert_allclose(
            value64("skew_kl", p_logits, q_logits, alpha=0.0),
            value64("forward_kl", p_logits, q_logits),
        )
        np.testing.assert_allclose(
            value64("skew_reverse_kl", p_logits, q_logits, alpha=0.0),
            value64("reverse_kl", p_logits, q_logits),
        )
        np.testing.assert_allclose(value64("skew_kl", p_logits, q_logits, alpha=1.0), 0.0)

    def test_alpha_beta_special_cases_and_continuity(self):
        rng = np.random.default_rng(6)
        p_logits, q_logits = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
        ab = lambda a, b: value64("alpha_beta", p_logits, q_logits, alpha=a, beta=b)
        same = lambda name, **kw: value64(name, p_logits, q_logits, **kw)
        np.testing.assert_allclose(ab(1.0, 0.0), same("forward_kl"), rtol=1e-12)
        np.testing.assert_allclose(ab(0.0, 1.0), same("reverse_kl"), rtol=1e-12)
        np.testing.assert_allclose(ab(0.3, 0.7), same("alpha", alpha=0.3), rtol=1e-10)
        np.testing.assert_allclose(ab(2.0, -1.0), same("alpha", alpha=2.0), rtol=1e-10)
        log_p, log_q = log_softmax(p_logits, -1), log_softmax(q_logits, -1)
        np.testing.assert_allclose(ab(0.0, 0.0), 0.5 * ((log_p - log_q) ** 2).sum(-1))
        eps = 1e-6  # each limit branch is continuous with the general formula
        for (a, b), (a_eps, b_eps) in [
            ((0.7, 0.0), (0.7, eps)),
            ((0.0, 0.4), (eps, 0.4)),
            ((0.6, -0.6), (0.6, -0.6 + eps)),
            ((0.0, 0.0), (1e-4, 1e-4)),
        ]:
            np.testing.assert_allclose(ab(a, b), ab(a_eps, b_eps), rtol=2e-3)
            assert np.all(ab(a, b) >= 0)


class TestTemperatureAndGradients:
    def test_temperature(self):
        rng = np.random.default_rng(7)
        p_logits, q_logits = rng.normal(size=SHAPE) * 3, rng.normal(size=SHAPE) * 3
        for name in ("forward_kl", "jensen_shannon", "generalized_jsd"):
            np.testing.assert_allclose(
                categorical(name, p_logits, q_logits, temperature=2.5),
                categorical(name, p_logits / 2.5, q_logits / 2.5),
                rtol=1e-6,
            )
            hot = categorical(name, p_logits, q_logits, temperature=1e4)
            cold = categorical(name, p_logits, q_logits, temperature=0.5)
            assert np.all(hot < 1e-6) and np.all(cold > hot)
        with pytest.raises(ValueError, match="temperature"):
            categorical("forward_kl", p_logits, q_logits, temperature=0.0)

    def test_kl_gradients_wrt_student_logits(self):
        rng = np.random.default_rng(8)
        v, z = jnp.asarray(rng.normal(size=SHAPE)), jnp.asarray(rng.normal(size=SHAPE))
        t = 3.0
        p_t, q_t = jax.nn.softmax(v / t), jax.nn.softmax(z / t)
        hinton = jax.grad(lambda z: t**2 * categorical("forward_kl", v, z, temperature=t).sum())
        np.testing.assert_allclose(hinton(z), t * (q_t - p_t), rtol=1e-5, atol=1e-6)
        p, q = jax.nn.softmax(v), jax.nn.softmax(z)
        rkl = categorical("reverse_kl", v, z)
        grad_rkl = jax.grad(lambda z: categorical("reverse_kl", v, z).sum())(z)
        want = q * (jnp.log(q) - jnp.log(p) - rkl[:, None])
        np.testing.assert_allclose(grad_rkl, want, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("name,params", ALL_CASES, ids=ALL_IDS)
    def test_check_grads(self, name, params):
        rng = np.random.default_rng(9)
        with jax.enable_x64(True):
            v, z = jnp.asarray(rng.normal(size=SHAPE)), jnp.asarray(rng.normal(size=SHAPE))
            fn = lambda v, z: categorical(name, v, z, temperature=1.5, **params)
            check_grads(fn, (v, z), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


class TestApi:
    @pytest.mark.parametrize(
        "name,params,match",
        [
            ("kl", {}, "valid: reverse_kl"),
            ("skew_kl", {"alpha": 1.5}, r"\[0, 1\]"),
            ("generalized_jsd", {"beta": -0.1}, r"\[0, 1\]"),
            ("alpha_beta", {"alpha": 0.2}, "needs beta"),
            ("alpha_beta", {"alpha": 0.2, "beta": 0.5, "gamma": 1.0}, "takes alpha, beta"),
            ("alpha", {}, "takes alpha"),
            ("forward_kl", {"alpha": 0.5}, "no parameters"),
            ("skew_kl", {"alpha": float("nan")}, "finite"),
        ],
    )
    def test_errors(self, name, params, match):
        with pytest.raises(ValueError, match=match):
            categorical(name, jnp.zeros(3), jnp.zeros(3), **params)

    def test_names_axis_shapes_and_instances(self):
        assert categorical_names() == names() + KD_NAMES
        rng = np.random.default_rng(10)
        p_logits, q_logits = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
        value = categorical("jensen_shannon", p_logits, q_logits)
        chex.assert_shape(value, (2, 3))
        on_axis0 = categorical("jensen_shannon", p_logits.T, q_logits.T, axis=0)
        np.testing.assert_allclose(on_axis0, value.T, rtol=1e-6)
        np.testing.assert_allclose(
            categorical(get("alpha", alpha=0.5), p_logits, q_logits),
            categorical("alpha", p_logits, q_logits, alpha=0.5),
        )
        log_p, log_q = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
        np.testing.assert_allclose(
            categorical_from_log_probs("skew_kl", log_p, log_q),
            categorical("skew_kl", p_logits, q_logits),
            rtol=1e-6,
        )


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_vmap(self):
        rng = np.random.default_rng(11)
        p_logits = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
        q_logits = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
        for name, params in [("jensen_shannon", {}), ("alpha_beta", {"alpha": 0.2, "beta": 0.7})]:
            fn = lambda v, z, name=name, params=params: categorical(name, v, z, **params)
            got = self.variant(fn)(p_logits, q_logits)
            # jit may fuse and reorder float32 ops; alpha_beta cancels to ~1e-5 relative.
            np.testing.assert_allclose(got, fn(p_logits, q_logits), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(jax.vmap(fn)(p_logits, q_logits), got, rtol=1e-4)
            grad = self.variant(jax.grad(lambda z, fn=fn: fn(p_logits, z).sum()))(q_logits)
            assert np.all(np.isfinite(grad))


F_IDS = [f"{n}{''.join(f'-{k}{v}' for k, v in p.items())}" for n, p in F_CASES]


def _log_probs(p_logits, q_logits):
    return jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)


def _check_agreement(div, p_logits, q_logits, rtol, atol):
    """Generic and closed form: values, and gradients w.r.t. the student's logits (the closed
    forms assume normalised inputs, so raw log-probability gradients may differ)."""
    closed = lambda z: div.categorical(*_log_probs(p_logits, z))
    generic = lambda z: categorical_generic(div, *_log_probs(p_logits, z))
    want = closed(q_logits)
    assert want.dtype == q_logits.dtype
    np.testing.assert_allclose(generic(q_logits), want, rtol=rtol, atol=atol)
    grad = lambda fn: jax.grad(lambda z: fn(z).sum())(q_logits)
    atol_g = 10 * rtol * np.max(np.abs(grad(closed)))
    np.testing.assert_allclose(grad(generic), grad(closed), rtol=10 * rtol, atol=atol_g)


@pytest.fixture
def generic_only(monkeypatch):
    """The registry with every closed categorical form removed: all go through the fallback."""
    for name, gen in list(f_divergences._REGISTRY.items()):
        monkeypatch.setitem(f_divergences._REGISTRY, name, gen._replace(categorical=None))


@pytest.mark.parametrize("name,params", F_CASES, ids=F_IDS)
class TestGenericFallback:
    """`categorical_generic` (sum_k q_k f(p_k/q_k) from the registry's f) against each closed
    form: the closed forms are better conditioned, not different."""

    @pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])
    def test_agrees_with_the_closed_form(self, name, params, scale):
        div = get(name, **params)
        rng = np.random.default_rng(12)
        p64, q64 = rng.normal(size=(20, 7)) * scale, rng.normal(size=(20, 7)) * scale
        for dtype, rtol, atol in ((np.float32, 1e-4, 1e-6), (np.float64, 1e-11, 1e-14)):
            with jax.enable_x64(dtype == np.float64):
                _check_agreement(div, jnp.asarray(p64, dtype), jnp.asarray(q64, dtype), rtol, atol)

    def test_zero_limits_masks_and_extremes(self, name, params):
        """p_k = q_k = 0 adds 0 (finite gradients), q_k = 0 < p_k adds p_k f'(inf), p_k = 0 < q_k
        adds q_k f(0), as in the closed forms; huge logits never give NaN."""
        div = get(name, **params)
        inf = jnp.inf
        p_logits = jnp.array([[0.0, -inf, -inf, -1.0], [0.0, 1.0, -inf, 2.0]])
        q_logits = jnp.array([[-inf, 0.0, -inf, -1.0], [1.0, 0.0, -inf, 0.5]])
        log_p, log_q = _log_probs(p_logits, q_logits)
        np.testing.assert_allclose(
            categorical_generic(div, log_p, log_q), div.categorical(log_p, log_q), rtol=1e-5
        )
        grad = jax.grad(lambda z: categorical_generic(div, log_p, jax.nn.log_softmax(z))[1])
        assert np.all(np.isfinite(grad(q_logits)[1]))  # row 1: one masked entry, finite value
        rng = np.random.default_rng(13)
        big = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=SHAPE), jnp.float32)
        log_p, log_q = _log_probs(big, jnp.roll(big, 1, axis=-1))
        value = categorical_generic(div, log_p, log_q)
        assert not np.any(np.isnan(value))
        if name not in ("forward_kl", "jeffreys"):  # f(r) overflows where p log r does not
            np.testing.assert_allclose(value, div.categorical(log_p, log_q), rtol=1e-5)
        grad = jax.grad(lambda z: categorical_generic(div, log_p, jax.nn.log_softmax(z)).sum())
        finite_rows = np.isfinite(np.asarray(value))  # rows of value +inf may have NaN grads
        assert not np.any(np.isnan(grad(jnp.roll(big, 1, axis=-1))[finite_rows]))

    def test_oracle_and_gradients_without_closed_forms(self, name, params, generic_only):
        rng = np.random.default_rng(14)
        p_logits, q_logits = rng.normal(size=SHAPE) * 3, rng.normal(size=SHAPE) * 3
        want = oracle(name, probs(p_logits), probs(q_logits), **params)
        np.testing.assert_allclose(
            value64(name, p_logits, q_logits, **params), want, rtol=1e-10, atol=1e-13
        )
        got32 = categorical(name, jnp.asarray(p_logits, jnp.float32), q_logits, **params)
        np.testing.assert_allclose(got32, want, rtol=2e-3, atol=2e-5)
        with jax.enable_x64(True):
            v, z = jnp.asarray(p_logits), jnp.asarray(q_logits)
            fn = lambda v, z: categorical(name, v, z, temperature=1.5, **params)
            check_grads(fn, (v, z), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def _triangular_f(l):
    """Triangular discrimination (Vincze-Le Cam): f(r) = (r - 1)^2 / (r + 1) = (r - 1) tanh(l/2);
    f(0) = 1 at l = -inf, f'(inf) = 1."""
    return jnp.expm1(l) * jnp.tanh(0.5 * l)


def _unused(*args, **kwargs):
    raise NotImplementedError


TRIANGULAR = f_divergences._Generator(
    f=_triangular_f,
    f_prime=lambda l: jnp.tanh(0.5 * l) * (1.0 + 2.0 * jax.nn.sigmoid(-l)),
    weight=None,
    log_weight=None,
    conjugate=_unused,
    activation=_unused,
    conjugate_activation=_unused,
)


@pytest.fixture
def triangular(monkeypatch):
    """A test-local f-divergence, registered the way a new one is: one registry entry."""
    monkeypatch.setitem(f_divergences._REGISTRY, "triangular", TRIANGULAR)
    return lambda p, q: np.sum((p - q) ** 2 / (p + q), axis=-1)


class TestRegisteringAnFDivergence:
    def test_categorical(self, triangular):
        assert "triangular" in names() and "triangular" in categorical_names()
        rng = np.random.default_rng(15)
        p_logits, q_logits = rng.normal(size=SHAPE) * 3, rng.normal(size=SHAPE) * 3
        want = triangular(probs(p_logits), probs(q_logits))
        np.testing.assert_allclose(value64("triangular", p_logits, q_logits), want, rtol=1e-12)
        got = categorical("triangular", p_logits, q_logits, temperature=2.0)
        np.testing.assert_allclose(got, triangular(probs(p_logits, 2), probs(q_logits, 2)), 1e-5)
        disjoint = categorical("triangular", jnp.array([0.0, -jnp.inf]), jnp.array([-jnp.inf, 0.0]))
        np.testing.assert_allclose(disjoint, 2.0)  # p f'(inf) + q f(0) = 1 + 1
        with jax.enable_x64(True):
            v, z = jnp.asarray(p_logits), jnp.asarray(q_logits)
            fn = lambda v, z: categorical("triangular", v, z)
            check_grads(fn, (v, z), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="no parameters"):
            categorical("triangular", p_logits, q_logits, alpha=0.5)

    def test_kd_and_step_halving(self, triangular):
        from didistill.distill import kd
        from didistill.distill.discrete import step_halving

        rng = np.random.default_rng(16)
        z, v = rng.normal(size=SHAPE).astype(np.float32), rng.normal(size=SHAPE).astype(np.float32)
        loss = kd.make_kd_loss("triangular", temperature=2.0)
        want = 4.0 * np.mean(triangular(probs(v, 2), probs(z, 2)))
        np.testing.assert_allclose(loss(z, v), want, rtol=1e-5)
        assert np.all(np.isfinite(jax.grad(loss)(jnp.asarray(z), v)))
        log_tau, log_student = _log_probs(v, z)
        value, count = step_halving.divergence_loss(
            "triangular", log_tau, log_student, jnp.ones(SHAPE[:1], bool)
        )
        np.testing.assert_allclose(value, np.mean(triangular(probs(v), probs(z))), rtol=1e-5)
