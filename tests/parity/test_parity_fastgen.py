"""Parity with NVlabs/FastGen (f-distill, DMD2 in FastGen), commit 34f30e8ff1a5.

Each reference formula is transcribed in NumPy below (facts, not code) and compared with this
package on random inputs. Line numbers are of the files at that commit:
- fastgen/methods/distribution_matching/f_distill.py: weights h(r) 20-28, the ratio pipeline
  (head mean, clamp, ratio clip, equal-width time bins, EMA, h normalisation) 59-111,
  the student loss 163-169;
- fastgen/methods/common_loss.py: x0 denoising loss 41-43, VSD loss 63-103, GAN losses 106-136;
- fastgen/methods/distribution_matching/dmd2.py: approximate R1 305-317, student every 5th
  iteration 67-77;
- fastgen/networks/noise_schedule.py: EDM Karras grid and step range 752-759, polynomial
  sampler 930-932;
- fastgen/networks/discriminators.py: Discriminator_EDM 62-137;
- fastgen/configs/methods/config_f_distill.py 22-34, config_dmd2.py 36-51.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from didistill.distill.one_step import losses as L
from didistill.distill.one_step import noise
from didistill.divergences import get, score_difference_weights
from didistill.nets.unet import LogitHeads

RNG = np.random.default_rng(0)

# f_distill.py 20-28: FastGen's name -> h(r), and ours (equal up to a constant factor, which the
# batch normalisation removes).
FASTGEN_H = {
    "reverse_kl": lambda r: np.ones_like(r),  # rkl
    "forward_kl": lambda r: r,  # kl
    "jensen_shannon": lambda r: 1 - 1 / (1 + r),  # js
    "squared_hellinger": lambda r: r**0.5,  # sh
    "jeffreys": lambda r: 1 + r,  # jf
    "neyman_chi2": lambda r: 1 / np.maximum(r, 1e-8),  # neyman
}


def _fastgen_grid(num=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    # noise_schedule.py 752-756: ascending Karras grid
    ramp = np.linspace(0, 1, num)
    sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return sig[::-1]


def _fastgen_sample_t(n, rng, min_pct=0.002, max_pct=0.998, num=1000):
    # noise_schedule.py 758-759 and 930-932: index uniform on [min_step, max_step] inclusive
    idx = rng.integers(int(min_pct * num), int(max_pct * num) + 1, n)
    return _fastgen_grid(num)[idx]


def _fastgen_h(logits, t, bins_buffer, f_div, ema_rate, num_bins=10, lo=0.1, hi=20.0):
    # f_distill.py 59-111 (float64 here)
    ratio = np.exp(np.clip(logits.mean(axis=1), -10.0, 10.0))
    ratio = np.clip(ratio, lo, hi)
    width = (80.0 - 0.002) / num_bins
    idx = np.clip(np.floor((t - 0.002) / width).astype(int), 0, num_bins - 1)
    cnt = np.bincount(idx, minlength=num_bins).astype(float)
    ratio_sum = np.bincount(idx, weights=ratio, minlength=num_bins)
    valid = cnt > 0
    new_vals = ratio_sum / (cnt + 1e-6)
    bins_buffer = bins_buffer.copy()
    bins_buffer[valid] = bins_buffer[valid] * ema_rate + (1 - ema_rate) * new_vals[valid]
    ratio = ratio / (bins_buffer[idx] + 1e-6)
    h = FASTGEN_H[f_div](ratio)
    return h / (h.mean() + 1e-6), bins_buffer


def _ours_h(logits, t, running, f_div, ema_rate, num_bins=10):
    log_r = L.process_log_ratio(jnp.asarray(logits))
    bins = noise.time_bins(jnp.asarray(t), num_bins)
    log_r, running = L.bin_normalize_log_ratio(log_r, bins, num_bins, running, ema_rate)
    return np.asarray(score_difference_weights(log_r, f_div)), running, log_r


@pytest.mark.parametrize("f_div", sorted(FASTGEN_H))
@pytest.mark.parametrize("ema_rate", [0.0, 0.5])
def test_ratio_pipeline_matches_fastgen(f_div, ema_rate):
    """Head mean, clamp, clip, equal-width bins, EMA buffer over two steps, h / mean h."""
    buffer, running = np.ones(10), jnp.ones(10)
    for step in range(2):
        logits = RNG.normal(0.0, 2.0, (256, 3))  # three heads, some beyond the clip
        t = _fastgen_sample_t(256, RNG)
        want, buffer = _fastgen_h(logits, t, buffer, f_div, ema_rate)
        got, running, _ = _ours_h(logits, t, running, f_div, ema_rate)
        np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(np.asarray(running), buffer, rtol=1e-5)


def test_bins_are_equal_width_in_sigma():
    """Bin 0 (sigma < 8) holds about 64% of FastGen's samples; the top bins are sparse."""
    t = _fastgen_sample_t(200_000, RNG)
    bins = np.asarray(noise.time_bins(jnp.asarray(t), 10))
    share = np.bincount(bins, minlength=10) / len(bins)
    assert 0.62 < share[0] < 0.66
    np.testing.assert_array_equal(bins, np.clip(np.floor((t - 0.002) / 7.9998), 0, 9))


def test_karras_index_sampler_matches_fastgen_ks():
    cfg = dict(num_sigmas=1000, sigma_min=0.002, sigma_max=80.0, min_index=2, max_index=998)
    sample = noise.make_sampler("karras_index", _Cfg(cfg))
    ours = np.asarray(sample(jax.random.key(0), 50_000))
    ref = _fastgen_sample_t(50_000, RNG)
    assert stats.ks_2samp(ours, ref).pvalue > 1e-3
    grid = _fastgen_grid()
    np.testing.assert_allclose(ours.min(), grid[2], rtol=1e-5)  # inclusive range ends
    np.testing.assert_allclose(ours.max(), grid[998], rtol=1e-5)


class _Cfg(dict):
    __getattr__ = dict.__getitem__


def _vsd_grad(gen, teacher, fake, h):
    # common_loss.py 80-103: w = h / (mean|gen - teacher| + 1e-6); the gradient of
    # 0.5 * mse(gen, gen - (fake - teacher) w) (mean reduction) is (fake - teacher) w / N.
    dims = tuple(range(1, gen.ndim))
    w = 1 / (np.abs(gen - teacher).mean(axis=dims, keepdims=True) + 1e-6)
    w = w * h.reshape((-1,) + (1,) * (gen.ndim - 1))
    return (fake - teacher) * w / gen.size


@pytest.mark.parametrize("f_div", ["reverse_kl", "forward_kl", "jensen_shannon"])
def test_distribution_matching_gradient_and_scale(f_div):
    shape = (4, 32, 32, 3)  # CIFAR-10
    gen, teacher, fake = (RNG.normal(0, 0.5, shape) for _ in range(3))
    logits = RNG.normal(0, 1, (4, 3))
    t = _fastgen_sample_t(4, RNG)
    h, _ = _fastgen_h(logits, t, np.ones(10), f_div, 0.0)
    _, _, log_r = _ours_h(logits, t, jnp.ones(10), f_div, 0.0)
    grad = jax.grad(L.f_distill_generator_loss)(
        jnp.asarray(gen, jnp.float32),
        jnp.asarray(teacher, jnp.float32),
        jnp.asarray(fake, jnp.float32),
        log_r,
        get(f_div),
    )
    np.testing.assert_allclose(grad, _vsd_grad(gen, teacher, fake, h), rtol=2e-4, atol=1e-12)


def test_gan_to_dm_gradient_ratio_at_published_weight():
    """At gan_weight 1e-3 on CIFAR-10 shapes the GAN gradient has FastGen's share of the total;
    a sum over pixels (the earlier loss) would have made it 3,072 times smaller."""
    shape, gan_weight = (8, 32, 32, 3), 1e-3
    gen, teacher, fake = (RNG.normal(0, 0.5, shape) for _ in range(3))
    v = RNG.normal(0, 0.02, shape[1:])  # a linear stand-in discriminator: logit = <v, x>

    def logit(x):
        return jnp.sum(x * v, axis=(1, 2, 3))

    def ours(x):
        main = L.f_distill_generator_loss(
            x, jnp.asarray(teacher), jnp.asarray(fake), jnp.zeros(8), get("reverse_kl")
        )
        return main, L.generator_gan_loss(logit(x))

    x = jnp.asarray(gen, jnp.float32)
    g_main = jax.grad(lambda x: ours(x)[0])(x)
    g_gan = gan_weight * jax.grad(lambda x: ours(x)[1])(x)
    # common_loss.py 106-119: softplus(-logit).mean(); its gradient is -sigmoid(-logit) v / B
    lg = np.sum(gen * v, axis=(1, 2, 3))
    ref_gan = gan_weight * (-1 / (1 + np.exp(lg)))[:, None, None, None] * v / 8
    ref_main = _vsd_grad(gen, teacher, fake, np.ones(8))
    np.testing.assert_allclose(g_gan, ref_gan, rtol=1e-4, atol=1e-12)
    ratio = np.linalg.norm(g_gan) / np.linalg.norm(g_main)
    want = np.linalg.norm(ref_gan) / np.linalg.norm(ref_main)
    np.testing.assert_allclose(ratio, want, rtol=1e-4)


def test_dmd_normalizer_matches_fastgen():
    gen, teacher = RNG.normal(0, 1, (5, 8, 8, 3)), RNG.normal(0, 1, (5, 8, 8, 3))
    want = 1 / (np.abs(gen - teacher).mean(axis=(1, 2, 3)) + 1e-6)  # common_loss.py 89-90
    got = L.dmd_normalizer(jnp.asarray(gen), jnp.asarray(teacher))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_fake_score_loss_is_unweighted_x0_mse():
    d_fake, x0 = RNG.normal(0, 1, (6, 4, 4, 3)), RNG.normal(0, 1, (6, 4, 4, 3))
    sigma = RNG.uniform(0.01, 80, 6)
    want = np.mean((x0 - d_fake) ** 2)  # common_loss.py 41-43, F.mse_loss mean
    got = L.fake_score_loss(jnp.asarray(d_fake), jnp.asarray(x0), jnp.asarray(sigma), 0.5, "none")
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gan_losses_and_r1():
    real, fake = RNG.normal(0, 2, (6, 3)), RNG.normal(0, 2, (6, 3))
    sp = lambda v: np.logaddexp(0, v)  # noqa: E731
    # common_loss.py 122-136 (mean over every logit, heads included)
    want = sp(fake).mean() + sp(-real).mean()
    np.testing.assert_allclose(L.discriminator_loss(real, fake), want, rtol=1e-5)
    np.testing.assert_allclose(L.generator_gan_loss(fake), sp(-fake).mean(), rtol=1e-5)
    shifted = real + RNG.normal(0, 0.1, real.shape)
    # dmd2.py 305-317: mse(real logit, logit at the perturbed real), mean
    np.testing.assert_allclose(L.r1_penalty(real, shifted), np.mean((real - shifted) ** 2))


def test_discriminator_heads_have_fastgen_layers():
    """discriminators.py 78-118: per head, 4x4/2 convs down to 8, 8 -> 4, 4x4/4 to 1x1, 1x1 conv
    to one logit; width = feature channels; logits [B, heads]."""
    c = 16
    feats = {r: jnp.ones((2, r, r, c)) for r in (32, 16, 8)}
    head = LogitHeads(resolutions=(32, 16, 8))
    params = head.init(jax.random.key(0), feats)["params"]
    kernels = {
        name: p["kernel"].shape for name, p in params.items() if "conv" in name or "out" in name
    }
    # 32: 32->16->8->4 (three 4x4/2) then 4x4/4 and the 1x1: 5 convs; 16: 4; 8: 3
    for res, n in ((32, 5), (16, 4), (8, 3)):
        convs = sorted(k for k in kernels if k.startswith(f"{res}x{res}_conv"))
        assert len(convs) == n - 1
        assert all(kernels[k] == (4, 4, c, c) for k in convs)
        assert kernels[f"{res}x{res}_out"] == (1, 1, c, 1)
    out = head.apply({"params": params}, feats)
    assert out.shape == (2, 3)
