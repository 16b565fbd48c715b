"""Tests for didistill.divergences.unlearning: FLAT (against its reference code) and NPO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from didistill.divergences import estimators, f_divergences, unlearning

FAST = settings(max_examples=20, deadline=None, derandomize=True)
ALL = [(n, {"alpha": 0.5} if n == "alpha" else {}) for n in f_divergences.names()]
ALL_IDS = [n for n, _ in ALL]


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------------------
# NumPy transcription of the reference, github.com/UCSC-REAL/FLAT at commit
# bf2ef07576de14b2493ceeda8f59e54e54926ae4, dataloader.py:
#   lines 103-131  loss type "cl": shifted logits/labels, ProbLossStable per example,
#                  torch.stack(...).mean() over the whole [B, T] batch, get_contrastive_loss
#   lines 793-804  ProbLossStable = NLLLoss(softmax(logits)), reduction none, ignore -100
#   lines 806-860  get_contrastive_loss: activation/conjugate per divergence, the loss is
#                  activation(-prob_sum_good) - conjugate(-prob_sum_unlearn), where the
#                  reference's "activation(x)" returns -mean(g(x)) and "conjugate(x)" returns
#                  -mean(f*(g(x))).
#   lines 52, 144-146  NPO: beta = 0.1, -logsigmoid(beta (nll_theta - nll_ref)) * 2 / beta,
#                  nll summed over tokens (data_module.py lines 889-898, get_batch_loss).
# Labels here are already shifted (the reference's logits[:, :-1], labels[:, 1:]).


def _ref_prob_loss(logits, labels):
    """ProbLossStable per position: -softmax(logits)[label], 0 where label == -100."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    picked = np.take_along_axis(p, np.maximum(labels, 0)[..., None], -1)[..., 0]
    return np.where(labels == -100, 0.0, -picked)


_REF_G_FSTAR = {  # name: (g(x), f*(g(x))) as written in get_contrastive_loss
    "KL": (lambda x: x, lambda x: np.exp(x - 1.0)),
    "Reverse-KL": (lambda x: -np.exp(x), lambda x: -1.0 - x),
    "Jeffrey": (lambda x: x, lambda x: x + x * x / 4.0 + x**3 / 16.0),
    "Squared-Hellinger": (lambda x: 1.0 - np.exp(x), lambda x: (1.0 - np.exp(x)) / np.exp(x)),
    "Pearson": (lambda x: x, lambda x: x * x / 4.0 + x),
    "Neyman": (lambda x: 1.0 - np.exp(x), lambda x: 2.0 - 2.0 * np.sqrt(1.0 - x)),
    "Jenson-Shannon": (
        lambda x: -np.log1p(np.exp(-x)) + np.log(2.0),
        lambda x: x + np.log1p(np.exp(-x)) - np.log(2.0),
    ),
    "Total-Variation": (lambda x: np.tanh(x) / 2.0, lambda x: np.tanh(x) / 2.0),
}


def _ref_contrastive(v_good, v_unlearn, div):
    """get_contrastive_loss on the critics (mean probabilities): -g(V_e) + f*(g(V_f))."""
    g, fstar_g = _REF_G_FSTAR[div]
    return -g(v_good) + fstar_g(v_unlearn)


def _ref_flat(logits_good, labels_good, logits_unlearn, labels_unlearn, div):
    v_good = -_ref_prob_loss(logits_good, labels_good).mean()  # mean over all B*T positions
    v_unlearn = -_ref_prob_loss(logits_unlearn, labels_unlearn).mean()
    return _ref_contrastive(v_good, v_unlearn, div)


def _ref_npo(nll_theta, nll_ref, beta=0.1):
    z = beta * (nll_theta - nll_ref)
    return np.mean(np.log1p(np.exp(-z))) * 2.0 / beta


# ----------------------------------------------------------------------------------------


def _token_log_probs(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], -1)[..., 0]


def _example(seed, batch=1, length=5, vocab=7, pad=0):
    rng = np.random.default_rng(seed)
    logits = [rng.normal(size=(batch, length, vocab)) * 1.5 for _ in range(2)]
    labels = [rng.integers(0, vocab, size=(batch, length)) for _ in range(2)]
    if pad:
        for lab in labels:
            lab[:, -pad:] = -100
    return logits, labels


def _library(logits, labels, name, params, critic="prob"):
    (lg, lf), (yg, yf) = logits, labels
    return unlearning.flat_loss(
        _token_log_probs(jnp.asarray(lg), yg),
        _token_log_probs(jnp.asarray(lf), yf),
        divergence=name,
        template_mask=yg != -100,
        forget_mask=yf != -100,
        critic=critic,
        **params,
    )


class TestReferenceParity:
    # reference name, library name, scale (reference = scale x library), critic sign
    MATCHES = [
        ("KL", "forward_kl", 1.0, 1.0),
        ("Pearson", "pearson_chi2", 1.0, 1.0),
        ("Total-Variation", "total_variation", 1.0, 1.0),
        ("Jenson-Shannon", "jensen_shannon", 2.0, 1.0),  # f-GAN's 2 x JS
        ("Reverse-KL", "reverse_kl", 1.0, -1.0),  # reference activation -exp(+v)
        ("Squared-Hellinger", "squared_hellinger", 2.0, -1.0),  # activation 1 - exp(+v)
    ]

    @pytest.mark.parametrize("ref_name,name,scale,sign", MATCHES, ids=[m[0] for m in MATCHES])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_one_unpadded_example(self, ref_name, name, scale, sign, seed):
        logits, labels = _example(seed)
        ref = _ref_flat(logits[0], labels[0], logits[1], labels[1], ref_name)
        if sign > 0:
            lib = _library(logits, labels, name, {})[0]
        else:  # the library's pair evaluated at critic -V
            fdiv = f_divergences.get(name)
            v = [-_ref_prob_loss(lg, y).mean() for lg, y in zip(logits, labels, strict=True)]
            lib = -fdiv.activation(-v[0]) + fdiv.conjugate_activation(-v[1])
        np.testing.assert_allclose(ref, scale * lib, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_neyman_conjugate_on_the_raw_critic(self, seed):
        """The reference's Neyman term is -g(-V_e) + f*(V_f): activation 1 - exp(+v) on the
        template, and the conjugate 2 - 2 sqrt(1 - t) applied to V_f without the activation."""
        logits, labels = _example(seed)
        ref = _ref_flat(logits[0], labels[0], logits[1], labels[1], "Neyman")
        fdiv = f_divergences.get("neyman_chi2")
        v = [-_ref_prob_loss(lg, y).mean() for lg, y in zip(logits, labels, strict=True)]
        np.testing.assert_allclose(ref, -fdiv.activation(-v[0]) + fdiv.conjugate(v[1]), rtol=1e-10)

    @pytest.mark.parametrize(
        "ref_name,name,forget_wrong",
        [
            ("Reverse-KL", "reverse_kl", True),
            ("Squared-Hellinger", "squared_hellinger", True),
            ("Neyman", "neyman_chi2", False),
        ],
    )
    def test_reference_sign_flip_trains_the_wrong_way(self, ref_name, name, forget_wrong):
        """d loss / d V_e > 0 in the reference (minimising it lowers the template) and, for
        reverse KL and Hellinger, d loss / d V_f < 0 (it raises the forget answer): the
        deviation in the module docstring. The library's weights are positive."""
        v = np.array([0.2, 0.5, 0.8])
        eps = 1e-6
        d_good = _ref_contrastive(v + eps, v, ref_name) - _ref_contrastive(v - eps, v, ref_name)
        d_forget = _ref_contrastive(v, v + eps, ref_name) - _ref_contrastive(v, v - eps, ref_name)
        assert np.all(d_good > 0)
        assert np.all(d_forget < 0) if forget_wrong else np.all(d_forget > 0)
        w_e, w_f = unlearning.flat_weights(v, v, name)
        assert np.all(w_e > 0) and np.all(w_f > 0)  # the library's loss goes the right way

    def test_jeffreys_reference_is_the_taylor_polynomial(self):
        """The reference's Jeffreys conjugate t + t^2/4 + t^3/16 is the exact conjugate's
        third-order Taylor polynomial at 0: the error is O(t^4)."""
        t = np.array([0.01, 0.02, 0.04, 0.08])
        exact = np.asarray(f_divergences.get("jeffreys").conjugate(jnp.asarray(t)))
        err = np.abs(exact - _REF_G_FSTAR["Jeffrey"][1](t))
        assert np.all(err < t**4)
        np.testing.assert_allclose(np.log2(err[1:] / err[:-1]), 4.0, atol=0.1)

    def test_padding_and_batch_reduction(self):
        """The reference's critic is one batch scalar sum_b n_b V_b / (B T) (padding counts
        as 0); the library's is V_b per example, normalised by n_b answer tokens."""
        logits, labels = _example(3, batch=2, length=6, pad=2)
        lp = _token_log_probs(jnp.asarray(logits[0]), labels[0])
        v = unlearning.flat_critic(lp, labels[0] != -100)  # [2]
        ref_scalar = -_ref_prob_loss(logits[0], labels[0]).mean()
        np.testing.assert_allclose(ref_scalar, np.sum(4 * v) / 12.0, rtol=1e-12)

    def test_npo(self):
        rng = np.random.default_rng(0)
        nll_theta, nll_ref = rng.uniform(5, 30, 8), rng.uniform(5, 30, 8)
        lib = unlearning.npo_loss(-nll_theta, -nll_ref, beta=0.1)
        np.testing.assert_allclose(np.mean(lib), _ref_npo(nll_theta, nll_ref), rtol=1e-10)


class TestFlatLoss:
    CASES = [(n, p, "prob") for n, p in ALL] + [
        (n, {}, c) for n in ("reverse_kl", "jensen_shannon") for c in unlearning.CRITICS[1:]
    ]

    @pytest.mark.parametrize("name,params,critic", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
    def test_gradient_matches_finite_differences(self, name, params, critic):
        logits, labels = _example(4, batch=2, length=4, vocab=5, pad=1)

        def loss(flat):
            lg = flat.reshape(2, *logits[0].shape)
            return jnp.mean(_library((lg[0], lg[1]), labels, name, params, critic))

        x = jnp.asarray(np.stack(logits).ravel())
        grad = np.asarray(jax.jit(jax.grad(loss))(x))
        eps = 1e-6
        basis = np.eye(x.size)[np.random.default_rng(0).choice(x.size, 12, replace=False)]
        batched = jax.jit(jax.vmap(loss))
        fd = (batched(x + eps * basis) - batched(x - eps * basis)) / (2 * eps)
        scale = max(np.max(np.abs(grad)), 1.0)  # RKL with summed log-probs reaches e^8
        np.testing.assert_allclose(basis @ grad, fd, rtol=1e-6, atol=1e-8 * scale)

    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    def test_mean_is_minus_the_variational_bound(self, name, params):
        rng = np.random.default_rng(5)
        lp_e, lp_f = np.log(rng.uniform(0.01, 1, (6, 3))), np.log(rng.uniform(0.01, 1, (6, 3)))
        loss = unlearning.flat_loss(lp_e, lp_f, divergence=name, **params)
        v_e, v_f = np.exp(lp_e).mean(-1), np.exp(lp_f).mean(-1)
        bound = estimators.variational_bound(name, v_e, v_f, **params)
        np.testing.assert_allclose(np.mean(loss), -bound, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize("name,params", ALL, ids=ALL_IDS)
    @FAST
    @given(v_e=st.floats(0.0, 1.0), v_f=st.floats(0.0, 1.0))
    def test_weights_positive_and_infimum(self, name, params, v_e, v_f):
        """Template weight g' > 0, forget weight (f* o g)' >= 0 on [0, 1]: the loss falls as
        the template rises and the forget answer falls, down to flat_infimum at (1, 0)."""
        w_e, w_f = unlearning.flat_weights(jnp.array([v_e]), jnp.array([v_f]), name, **params)
        assert w_e[0] > 0 and w_f[0] >= 0
        fdiv = f_divergences.get(name, **params)
        loss = -fdiv.activation(v_e) + fdiv.conjugate_activation(v_f)
        assert loss >= unlearning.flat_infimum(name, **params) - 1e-12

    def test_weight_closed_forms(self):
        v = jnp.linspace(0.0, 1.0, 11)
        w_e, w_f = unlearning.flat_weights(v, v, "forward_kl")
        np.testing.assert_allclose(w_e, 1.0)
        np.testing.assert_allclose(w_f, np.exp(v - 1.0), rtol=1e-12)
        w_e, w_f = unlearning.flat_weights(v, v, "total_variation")
        np.testing.assert_allclose(w_e, (1.0 - np.tanh(v) ** 2) / 2.0, rtol=1e-12)
        np.testing.assert_allclose(w_f, w_e, rtol=1e-12)
        w_e, w_f = unlearning.flat_weights(v, v, "pearson_chi2")
        np.testing.assert_allclose(w_f, 1.0 + v / 2.0, rtol=1e-12)
        w_e, w_f = unlearning.flat_weights(v, v, "reverse_kl")
        np.testing.assert_allclose(w_e, np.exp(-v), rtol=1e-12)
        np.testing.assert_allclose(w_f, 1.0)

    def test_critics(self):
        lp = jnp.log(jnp.array([[0.5, 0.25, 0.9]]))
        mask = jnp.array([[1, 1, 0]])
        np.testing.assert_allclose(unlearning.flat_critic(lp, mask), [0.375])
        np.testing.assert_allclose(
            unlearning.flat_critic(lp, mask, "log_prob"), [np.log(0.125) / 2]
        )
        np.testing.assert_allclose(
            unlearning.flat_critic(lp, mask, "sequence_log_prob"), [np.log(0.125)]
        )
        with pytest.raises(ValueError, match="unknown FLAT critic"):
            unlearning.flat_critic(lp, critic="probability")

    def test_float32_jit_finite(self):
        lp = jnp.full((3, 4), -60.0, jnp.float32)  # probabilities underflow to 0

        def total(a):  # every divergence in one compiled function
            return sum(jnp.sum(unlearning.flat_loss(a, lp, divergence=n, **p)) for n, p in ALL)

        out, grad = jax.jit(jax.value_and_grad(total))(lp)
        assert np.isfinite(out) and np.all(np.isfinite(grad))


class TestNPO:
    def test_small_beta_is_gradient_ascent(self):
        logps = jnp.array([-3.0, -1.0, -0.2])
        grad = jax.grad(lambda lp: jnp.sum(unlearning.npo_loss(lp, jnp.zeros(3), beta=1e-6)))
        np.testing.assert_allclose(grad(logps), 1.0, rtol=1e-5)

    def test_gradient_matches_finite_differences(self):
        logps, ref = jnp.array([-3.0, -1.0, 2.0]), jnp.array([-2.0, -2.0, 0.0])
        grad = jax.grad(lambda lp: jnp.sum(unlearning.npo_loss(lp, ref, beta=0.1)))(logps)
        eps = 1e-6
        for i in range(3):
            e = jnp.zeros(3).at[i].set(eps)
            fd = (
                jnp.sum(unlearning.npo_loss(logps + e, ref))
                - jnp.sum(unlearning.npo_loss(logps - e, ref))
            ) / (2 * eps)
            np.testing.assert_allclose(grad[i], fd, rtol=1e-6)
