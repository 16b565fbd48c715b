"""f-divergence registry: generators, weights and conjugates against the table of docs/design.md."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from didistill.divergences import FDivergence, get, names
from didistill.divergences.f_divergences import resolve

NAMES = (
    "reverse_kl",
    "forward_kl",
    "jensen_shannon",
    "squared_hellinger",
    "jeffreys",
    "pearson_chi2",
    "neyman_chi2",
    "total_variation",
    "softened_reverse_kl",
    "alpha",
)
ALPHAS = (-1.0, 0.5, 2.0)
CASES = [(n, {}) for n in NAMES if n != "alpha"] + [("alpha", {"alpha": a}) for a in ALPHAS]
WEIGHTED = [c for c in CASES if c[0] != "total_variation"]
IDS = [f"{n}{p.get('alpha', '')}" for n, p in CASES]
W_IDS = [i for i in IDS if i != "total_variation"]
SETTINGS = settings(max_examples=25, deadline=None)
# Few distinct array shapes: eager JAX compiles each primitive once per shape and dtype.
SMALL = 16
BIG = 4001
EXTREMES = np.array([-1e4, -1e3, -100.0, 100.0, 1e3, 1e4])
GRID = np.concatenate([np.linspace(-50.0, 50.0, 201), EXTREMES])  # [207]


def design_f(name, r, alpha=None):
    """The f column of the README's table, in NumPy float64."""
    log = np.log(r)
    return {
        "reverse_kl": lambda: -log,
        "forward_kl": lambda: r * log,
        "jensen_shannon": lambda: 0.5 * (r * log - (r + 1) * np.log((r + 1) / 2)),
        "squared_hellinger": lambda: 1 - np.sqrt(r),
        "jeffreys": lambda: (r - 1) * log,
        "pearson_chi2": lambda: (r - 1) ** 2,
        "neyman_chi2": lambda: (1 - r) ** 2 / r,
        "total_variation": lambda: 0.5 * np.abs(r - 1),
        "softened_reverse_kl": lambda: (r + 1) * np.log((r + 1) / (2 * r)),
        "alpha": lambda: (r**alpha - 1 - alpha * (r - 1)) / (alpha * (alpha - 1)),
    }[name]()


def design_h(name, r, alpha=None):
    """The h column of the README's table."""
    return {
        "reverse_kl": lambda: np.ones_like(r),
        "forward_kl": lambda: r,
        "jensen_shannon": lambda: r / (2 * (r + 1)),
        "squared_hellinger": lambda: np.sqrt(r) / 4,
        "jeffreys": lambda: r + 1,
        "pearson_chi2": lambda: 2 * r**2,
        "neyman_chi2": lambda: 2 / r,
        "softened_reverse_kl": lambda: 1 / (r + 1),
        "alpha": lambda: r**alpha,
    }[name]()


def log_r_arrays(lo=-20.0, hi=20.0):
    return hnp.arrays(np.float64, (SMALL,), elements=st.floats(lo, hi))


def evaluate(div, x, methods):
    """{method: (value, elementwise derivative)} as NumPy arrays."""
    out = {}
    for method in methods:
        fn = getattr(div, method)
        out[method] = (np.asarray(fn(x)), np.asarray(jax.vmap(jax.grad(fn))(x)))
    return out


@functools.partial(jax.jit, static_argnums=0)
def autodiff_derivatives(div, log_r):
    """d f / d r, d f_prime / d r and d^2 f / d r^2 by autodiff in r = exp(log_r)."""
    f_of_r = lambda r: div.f(jnp.log(r))
    f_prime_of_r = lambda r: div.f_prime(jnp.log(r))
    r = jnp.exp(log_r)
    d1 = jax.vmap(jax.grad(f_of_r))(r)
    d2 = jax.vmap(jax.grad(f_prime_of_r))(r)
    d2_twice = jax.vmap(jax.grad(jax.grad(f_of_r)))(r)
    return d1, r**2 * d2, r**2 * d2_twice, div.f(log_r), div.f_prime(log_r)


class TestRegistry:
    def test_names_are_the_design_table(self):
        assert names() == NAMES

    @pytest.mark.parametrize(
        "name,params,match",
        [
            ("kl", {}, "valid names: reverse_kl, forward_kl"),
            ("alpha", {}, "takes alpha"),
            ("alpha", {"alpha": 0.0}, "differ from 0 and 1"),
            ("alpha", {"alpha": 1}, "differ from 0 and 1"),
            ("alpha", {"alpha": float("nan")}, "finite"),
            ("alpha", {"alpha": float("inf")}, "finite"),
            ("alpha", {"alpha": "0.5"}, "real Python number"),
            ("alpha", {"alpha": 0.5, "beta": 1.0}, "takes alpha"),
            ("reverse_kl", {"alpha": 0.5}, "takes no parameters"),
        ],
    )
    def test_bad_name_or_parameter_raises(self, name, params, match):
        with pytest.raises(ValueError, match=match):
            get(name, **params)

    def test_equal_and_hashable_for_static_jit(self):
        a, b = get("alpha", alpha=0.5), get("alpha", alpha=0.5)
        assert a == b and hash(a) == hash(b) and a != get("alpha", alpha=2.0)
        fn = jax.jit(lambda d, x: d.f(x), static_argnums=0)
        np.testing.assert_allclose(fn(a, jnp.ones(3)), a.f(jnp.ones(3)))
        assert resolve("forward_kl") == get("forward_kl") and resolve(a) is a
        with pytest.raises(ValueError, match="FDivergence"):
            resolve(3)

    def test_total_variation_has_no_weight(self):
        tv = get("total_variation")
        assert not tv.has_weight
        for method in (tv.weight, tv.log_weight):
            with pytest.raises(ValueError, match="no weight h"):
                method(jnp.zeros(2))

    def test_integer_input_is_promoted(self):
        assert get("forward_kl").f(jnp.arange(3)).dtype == jnp.float32


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
class TestGenerator:
    def test_f_is_the_design_generator_and_vanishes_at_one(self, name, params):
        log_r = np.linspace(-20.0, 20.0, BIG)
        with jax.enable_x64(True):
            div = get(name, **params)
            got = np.asarray(div.f(jnp.asarray(log_r)))
            at_one = np.asarray(div.f(jnp.zeros(SMALL)))
        want = design_f(name, np.exp(log_r), params.get("alpha"))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        assert np.all(at_one == 0.0) and np.all(np.asarray(div.f(jnp.zeros(SMALL))) == 0.0)

    @SETTINGS
    @given(log_r=log_r_arrays())
    def test_f_prime_and_weight_match_autodiff(self, name, params, log_r):
        with jax.enable_x64(True):
            div = get(name, **params)
            d1, r2_d2, r2_d2_twice, f, f_prime = autodiff_derivatives(div, jnp.asarray(log_r))
            d1, r2_d2, r2_d2_twice = np.asarray(d1), np.asarray(r2_d2), np.asarray(r2_d2_twice)
            f, f_prime = np.asarray(f), np.asarray(f_prime)
            if div.has_weight:
                weight = np.asarray(div.weight(jnp.asarray(log_r)))
                log_weight = np.asarray(div.log_weight(jnp.asarray(log_r)))
            else:
                weight = log_weight = 0.0
        r = np.exp(log_r)
        # Autodiff in float64 is itself inexact where large terms cancel (f ~ r while f'' ~ 1/r^3;
        # JAX differentiates expm1(x) as expm1(x) + 1): allow float64 rounding of those terms.
        kink = (name == "total_variation") & (np.abs(log_r) < 1e-6)  # f' jumps at r = 1
        np.testing.assert_array_less(
            np.abs(f_prime - d1)[~kink], (1e-7 * np.abs(d1) + 1e-12 * (np.abs(f) / r + 1))[~kink]
        )
        cancel = 1e-12 * (np.abs(f) + r * np.abs(f_prime) + r + 1)
        np.testing.assert_array_less(np.abs(weight - r2_d2), 1e-7 * np.abs(weight) + cancel)
        np.testing.assert_array_less(np.abs(weight - r2_d2_twice), 1e-6 * np.abs(weight) + cancel)
        if name == "total_variation":
            return
        design = design_h(name, r, params.get("alpha"))
        np.testing.assert_allclose(weight, design, rtol=1e-10)
        np.testing.assert_allclose(log_weight, np.log(weight), rtol=1e-10, atol=1e-12)
        assert np.all(weight > 0)  # f convex

    @SETTINGS
    @given(log_u=log_r_arrays(-8.0, 8.0), log_s=log_r_arrays(-4.0, 4.0))
    def test_fenchel_young(self, name, params, log_u, log_s):
        """f*(t) >= t u - f(u) for all u, with equality at t = f'(s), u = s."""
        with jax.enable_x64(True):
            div = get(name, **params)
            t = np.asarray(div.f_prime(jnp.asarray(log_s)))  # [16] points of dom f*
            f_s = np.asarray(div.f(jnp.asarray(log_s)))
            conj = np.asarray(div.conjugate(jnp.asarray(t)))
            f_u = np.asarray(div.f(jnp.asarray(log_u)))
        lower = t[:, None] * np.exp(log_u)[None, :] - f_u[None, :]  # [16, 16]
        assert np.all(conj[:, None] >= lower - 1e-9 * (1 + np.abs(lower)))
        np.testing.assert_allclose(conj, t * np.exp(log_s) - f_s, rtol=1e-9, atol=1e-9)

    def test_conjugate_is_a_supremum_and_activation_maps_into_its_domain(self, name, params):
        log_u = np.linspace(-25.0, 25.0, BIG)
        t = np.linspace(-6.0, 6.0, SMALL)
        v = np.linspace(-15.0, 15.0, SMALL)
        with jax.enable_x64(True):
            div = get(name, **params)
            conj = np.asarray(div.conjugate(jnp.asarray(t)))
            f_u = np.asarray(div.f(jnp.asarray(log_u)))
            direct = np.asarray(div.conjugate(div.activation(jnp.asarray(v))))
            closed = np.asarray(div.conjugate_activation(jnp.asarray(v)))
        brute = np.max(t[:, None] * np.exp(log_u)[None] - f_u[None], axis=1)  # [16]
        assert not np.any(np.isnan(conj))
        inside = np.isfinite(conj)
        np.testing.assert_allclose(conj[inside], brute[inside], rtol=1e-3, atol=1e-3)
        assert np.all(brute[~inside] > 20)  # the sup really diverges there
        assert np.all(np.isfinite(direct))  # g(v) lies in dom f*
        np.testing.assert_allclose(closed, direct, rtol=1e-7, atol=1e-9)

    def test_no_nan_and_float32_finite_where_representable(self, name, params):
        """No NaN value for any finite input (here up to |log_r| = 1e4). For |log_r| <= 50,
        float32 values and gradients are finite and accurate wherever the exact (float64)
        value fits in float32; where a value overflows to +-inf its gradient may not exist."""
        div = get(name, **params)
        x32 = jnp.asarray(GRID, jnp.float32)
        for method in ("conjugate", "activation", "conjugate_activation"):
            assert not np.any(np.isnan(getattr(div, method)(x32))), method
        smooth = ["f", "f_prime"] + (["weight", "log_weight"] if div.has_weight else [])
        got = evaluate(div, x32, smooth)
        with jax.enable_x64(True):
            exact = evaluate(div, jnp.asarray(GRID), smooth)
        if div.has_weight:
            assert np.all(np.isfinite(got["log_weight"][0]))
        moderate = np.abs(GRID) <= 50
        for method in smooth:
            value, grad = got[method]
            assert not np.any(np.isnan(value)), method
            assert not np.any(np.isnan(grad) & np.isfinite(value)), method
            for value, ref in zip(got[method], exact[method], strict=True):
                fits = moderate & (np.abs(ref) < 1e38)
                assert np.all(np.isfinite(value[fits])), (method, GRID[~np.isfinite(value) & fits])
                np.testing.assert_allclose(value[fits], ref[fits], rtol=2e-5, atol=1e-5)


class TestFamilyIdentities:
    def test_alpha_limits_and_special_cases(self):
        """alpha -> 0 / 1 gives reverse / forward KL up to the affine term (r - 1), which does
        not change the divergence; alpha = 1/2, 2, -1 give 4 x Hellinger (+ 2(r-1)),
        Pearson / 2 and Neyman / 2."""
        log_r = np.linspace(-5.0, 5.0, SMALL)
        r_minus_1 = np.expm1(log_r)
        close = np.testing.assert_allclose
        with jax.enable_x64(True):
            f = lambda n, **p: np.asarray(get(n, **p).f(jnp.asarray(log_r)))
            h = lambda n, **p: np.asarray(get(n, **p).weight(jnp.asarray(log_r)))
            close(f("alpha", alpha=1e-7), f("reverse_kl") + r_minus_1, atol=1e-4)
            close(f("alpha", alpha=1 - 1e-7), f("forward_kl") - r_minus_1, rtol=1e-4, atol=1e-5)
            close(h("alpha", alpha=1e-7), h("reverse_kl"), rtol=1e-5)
            close(h("alpha", alpha=1 - 1e-7), h("forward_kl"), rtol=1e-5)
            close(f("alpha", alpha=0.5), 4 * f("squared_hellinger") + 2 * r_minus_1, atol=1e-12)
            close(h("alpha", alpha=0.5), 4 * h("squared_hellinger"))
            close(f("alpha", alpha=2.0), f("pearson_chi2") / 2, atol=1e-15)
            close(f("alpha", alpha=-1.0), f("neyman_chi2") / 2, atol=1e-15)

    def test_jensen_shannon_is_bounded_and_self_dual(self):
        js = get("jensen_shannon")
        log_r = jnp.asarray(GRID, jnp.float32)
        values = js.f(log_r)
        np.testing.assert_allclose(values[GRID == -1e4], np.log(2) / 2, rtol=1e-6)
        # r f(1/r) = f(r): JS(p || q) = JS(q || p).
        moderate = np.abs(GRID) <= 20
        np.testing.assert_allclose(
            (jnp.exp(log_r) * js.f(-log_r))[moderate], values[moderate], rtol=1e-5, atol=1e-6
        )


class VariantsTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(i, n, p) for i, (n, p) in zip(W_IDS, WEIGHTED, strict=True)])
    def test_jit_vmap_grad(self, name, params):
        div = get(name, **params)
        log_r = jnp.asarray(GRID / 10.0, jnp.float32)[:201]  # [-5, 5]

        @self.variant
        def all_methods(x):
            return div.f(x), div.f_prime(x), div.weight(x), div.log_weight(x)

        want = div.f(log_r), div.f_prime(log_r), div.weight(log_r), div.log_weight(log_r)
        for got, expected in zip(all_methods(log_r), want, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # d f(e^l) / dl = r f'(r), via vmap(grad).
        dfdl = jax.vmap(jax.grad(div.f))(log_r)
        np.testing.assert_allclose(dfdl, jnp.exp(log_r) * div.f_prime(log_r), rtol=1e-5, atol=1e-5)
        # FDivergence is a static value: passing it as a static argument works.
        jitted = jax.jit(lambda d, x: d.weight(x), static_argnums=0)
        np.testing.assert_allclose(jitted(div, log_r), div.weight(log_r), rtol=1e-6)
        assert isinstance(div, FDivergence)
