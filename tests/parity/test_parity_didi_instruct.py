"""Parity with the DiDi-Instruct and SDTT reference code (issue 20, part 5).

Each reference formula is restated in NumPy below (facts, not code) and compared with this
package. Sources:
- haoyangzheng-ai/didi-instruct @ 7825a02 (the published evaluation code): `algo.py`
  `reward_guided_ancestral_step` 305-369 (tilt, candidates, softmax choice), `generate_samples`
  371-427 (grid linspace(1, 1e-5, N + 1), ramp over the tilt steps, rerank_start_step =
  int(N (1 - ratio)), final `_denoiser_update`); `configs/algo/didi_instruct.yaml` 39-42
  (guidance 30 -> 40, 4 candidates, ratio 0.5).
- the authors' training-code release of `algo.py` (announced in the README on 2026-02-05; not
  in the mirrored 7825a02, where these methods are stubs; read in the public code index):
  `_get_rewards` (log-odds clip +-8, masked mean, group mean and `.std()` (ddof 1), eps 1e-8,
  clamp 3), `_get_regularization` (entropy `(entropy_step1 + entropy_step2) / 2`), `_get_lr`
  (warm-up `peak (k + 1) / W`, then `max(peak (1 - (k - W) / (T - W)), 1e-8)` for both
  optimisers), `DiscriminatorHead` (spectral_norm(Linear) -> SiLU -> spectral_norm(Linear)),
  `training_step` (`x0_real = input_ids`: corrupted data is the real side).
- jdeschena/sdtt @ 9172b86: src/sdtt/core/diffusion/absorbing.py `_sample_t` 145-162
  (antithetic times), src/sdtt/configs/config.yaml 51-53 (antithetic on, sampling_eps 1e-5).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import synthetic_didi, synthetic_sdtt
from didistill.diffusion import masked
from didistill.distill.discrete import didi, guided_sampling
from didistill.distill.discrete import didi_losses as dl
from didistill.distill.discrete import step_halving as sh
from didistill.train import optim

RNG = np.random.default_rng(0)


def _ref_rewards(logits, mask, group, clip=8.0, adv_clip=3.0, eps=1e-6):
    """`_get_rewards`, float64: per-token log-odds of sigmoid(d), clipped, masked mean, then
    the grouped z-score with torch.std (ddof 1) and eps 1e-8, clamped."""
    p = 1.0 / (1.0 + np.exp(-logits))
    log_odds = np.clip(np.log(p + eps) - np.log(1 - p + eps), -clip, clip)
    reward = np.sum(np.where(mask, log_odds, 0.0), -1) / (mask.sum(-1) + 1e-8)
    groups = reward.reshape(-1, group)
    adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-8)
    return np.clip(adv, -adv_clip, adv_clip).ravel()


def test_grouped_rewards_match_get_rewards():
    logits = RNG.normal(0.0, 3.0, (12, 10))  # 3 groups of G = 4, L = 10
    mask = RNG.random((12, 10)) < 0.6
    reward = dl.sequence_reward(jnp.asarray(logits, jnp.float32), jnp.asarray(mask), 8.0)
    ours = dl.grouped_normalize(reward, 4, clip=3.0)
    np.testing.assert_allclose(ours, _ref_rewards(logits, mask, 4), atol=2e-4)
    # ddof = 0 would differ by sqrt(G / (G - 1)) before the clamp
    assert not np.allclose(dl.grouped_normalize(reward, 4, ddof=0), ours, atol=1e-2)


def test_entropy_bonus_is_averaged_over_the_two_steps():
    """`_get_regularization`: (H_1 + H_2) / 2, each a masked mean of the step's entropy."""
    v1, mask_id = 6, 6
    fake = types.SimpleNamespace(
        d=types.SimpleNamespace(kl_weight=0.0, entropy_weight=1.0),
        scaffold=types.SimpleNamespace(mask_id=mask_id),
    )
    steps, expected = [], []
    for _ in range(2):
        logits = RNG.normal(size=(3, 5, v1 + 1))
        z = np.where(RNG.random((3, 5)) < 0.5, mask_id, RNG.integers(0, v1, (3, 5)))
        steps.append((jnp.asarray(z), None, jnp.asarray(logits, jnp.float32)))
        p = np.exp(logits[..., :-1]) / np.exp(logits[..., :-1]).sum(-1, keepdims=True)
        h = -np.sum(p * np.log(p), -1)
        m = z == mask_id
        expected.append(np.sum(h * m) / (m.sum() + 1e-8))
    _, ent = didi.DiDiInstruct.regularisers(fake, steps)
    np.testing.assert_allclose(float(ent), np.mean(expected), rtol=1e-5)


@pytest.mark.parametrize("peak, warmup, total", [(1e-5, 1000, 10_000), (1e-3, 0, 4), (2e-4, 3, 9)])
def test_warmup_linear_decay_matches_get_lr(peak, warmup, total):
    def ref(k):  # `_get_lr`'s get_lr at global step k
        if k < warmup:
            return peak * (k + 1) / warmup
        return max(peak * (1.0 - (k - warmup) / (total - warmup)), 1e-8)

    schedule = optim.warmup_linear_decay(peak, warmup, total)
    for k in sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1, total // 2, total - 1, total}):
        np.testing.assert_allclose(float(schedule(k)), ref(k), rtol=1e-6, atol=1e-12)


def test_didi_config_uses_the_reference_schedule_for_both_optimisers():
    config = synthetic_didi.get_config("markov")
    for block in (config.optim_student, config.optim_discriminator):
        assert block.schedule == "warmup_linear_decay"
        assert block.warmup_steps == config.optim_student.warmup_steps
    opt = optim.make_optimizer(config.optim_student, total_steps=config.train.num_steps)
    assert opt is not None
    with pytest.raises(ValueError, match="decay_steps .* > warmup_steps"):
        optim.make_optimizer(config.optim_student, total_steps=50)


def _torch_spectral_norm(w_out_in, u):
    """torch.nn.utils.spectral_norm, one power iteration from u: v = W^T u / |.|,
    u = W v / |.|, sigma = u^T W v, weight W / sigma (W [out, in], eps 1e-12)."""
    v = w_out_in.T @ u
    v = v / max(np.linalg.norm(v), 1e-12)
    u = w_out_in @ v
    u = u / max(np.linalg.norm(u), 1e-12)
    return w_out_in / (u @ w_out_in @ v), u


def test_spectral_norm_head_matches_torch_spectral_norm():
    head = didi.TokenHead(8, spectral_norm=True, layer_norm=False)
    hidden = jnp.asarray(RNG.normal(size=(2, 5, 8)), jnp.float32)
    variables = head.init(jax.random.key(0), hidden)
    out, new = head.apply(variables, hidden, update_stats=True, mutable=["batch_stats"])
    params, stats = variables["params"], variables["batch_stats"]
    layers = []
    for name in ("hidden", "out"):
        w = np.asarray(params[name]["kernel"], np.float64).T  # [out, in]
        u0 = np.asarray(stats[f"sn_{name}"][f"{name}/kernel/u"], np.float64)[0]
        w_sn, u1 = _torch_spectral_norm(w, u0)
        np.testing.assert_allclose(new["batch_stats"][f"sn_{name}"][f"{name}/kernel/u"][0], u1,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        layers.append((w_sn, np.asarray(params[name]["bias"], np.float64)))
    (w1, b1), (w2, b2) = layers
    h = np.asarray(hidden, np.float64) @ w1.T + b1
    h = h / (1.0 + np.exp(-h))  # SiLU
    np.testing.assert_allclose(out, (h @ w2.T + b2)[..., 0], rtol=1e-4, atol=1e-5)
    # the largest singular value of the normalised kernel approaches 1 under repeated updates
    assert abs(np.linalg.svd(w1, compute_uv=False)[0] - 1.0) < 0.5


def test_didi_defaults_follow_the_reference():
    config = synthetic_didi.get_config("markov")
    assert config.distill.real == "data"  # `x0_real = input_ids`, corrupted at tau
    g = config.eval.guided
    assert (g.guidance_scale, g.guidance_scale_end, g.best_of, g.tilt_until) == (30, 40, 4, 0.5)
    assert (g.rerank_temperature, g.rerank_positions, g.final_eps) == (1.0, "all", 1e-5)
    assert g.tilt_input == "prediction" and g.aggregate == "sum"


# reward-guided sampling

V, MASK, A = 4, 4, 2


def _uniform_student(z, t):
    del t
    return jnp.zeros(z.shape + (V + 1,))


def _count_a(tokens, t, positions, beta=1.0):
    del t
    hits = tokens[..., A] if tokens.ndim == 3 else (tokens == A).astype(jnp.float32)
    return beta * jnp.sum(jnp.where(positions, hits, 0.0), axis=-1)


def _rgas(key, num_steps, batch, length, **kw):
    base = dict(guidance_scale=0.0, tilt_until=1.0, best_of=2, cache=False)
    base.update(kw)
    fn = lambda k: guided_sampling.guided_sample(
        _uniform_student, _count_a, k, batch, length, num_steps, MASK,
        masked.LogLinearSchedule(), base.pop("guidance_scale"), base.pop("tilt_until"),
        base.pop("best_of"), **base,
    )  # fmt: skip
    return jax.jit(fn)(key)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rerank_chooses_by_softmax_sampling_or_argmax(temperature):
    """One step, L = 1, two uniform candidates over V = 4 tokens, score 1[token = A]:
    P(keep A) = p^2 + 2 p (1 - p) w, p = 1/4, w = e / (e + 1) (softmax) or 1 (argmax)."""
    tokens, _ = _rgas(jax.random.key(0), 1, 40_000, 1, final_eps=0.0,
                      rerank_temperature=temperature)  # fmt: skip
    p, w = 1 / V, (np.e / (np.e + 1) if temperature else 1.0)
    expected = p * p + 2 * p * (1 - p) * w
    assert abs(float(jnp.mean(tokens == A)) - expected) < 0.01, float(jnp.mean(tokens == A))


def test_rerank_scores_every_position_not_only_masked_ones():
    """At the last step nothing is masked: scoring masked positions only cannot re-rank (the
    kept sample is candidate 1), scoring all L positions (the reference) can."""
    key = jax.random.key(3)
    plain, _ = _rgas(key, 1, 512, 6, best_of=1, final_eps=0.0)
    only_masked, _ = _rgas(key, 1, 512, 6, final_eps=0.0, rerank_temperature=0.0,
                           rerank_positions="masked")  # fmt: skip
    every, _ = _rgas(key, 1, 512, 6, final_eps=0.0, rerank_temperature=0.0)
    np.testing.assert_array_equal(only_masked, plain)
    assert float(jnp.mean(every == A)) > float(jnp.mean(plain == A)) + 0.05


def test_final_denoising_step_and_tilt_step_count():
    """Grid linspace(1, 1e-5, N + 1) then one denoising step: N + 1 student calls, no [MASK]
    left; int(N (1 - ratio)) tilt steps (N = 5, ratio 0.5: 2)."""
    tokens, nfe = _rgas(jax.random.key(1), 5, 16, 6, guidance_scale=30.0,
                        guidance_scale_end=40.0, tilt_until=0.5, best_of=4)  # fmt: skip
    assert not bool(jnp.any(tokens == MASK))
    assert int(nfe["student"]) == 6
    assert int(nfe["discriminator_backward"]) == 2
    assert int(nfe["discriminator"]) == 2 + 4 * 3


# SDTT


def test_sdtt_antithetic_times_match_sample_t():
    eps, n = 1e-5, 16
    t = np.asarray(sh.antithetic_times(jax.random.key(0), n), np.float64)
    u = (t[0] - eps) / (1 - eps)  # the shared uniform draw
    ref = (1 - eps) * np.mod(u + np.linspace(0, 1, n + 1)[:-1], 1.0) + eps  # `_sample_t`
    np.testing.assert_allclose(t, ref, atol=1e-6)
    assert synthetic_sdtt.get_config("markov").distill.time_sampling == "antithetic"
    t, m, s = sh.step_times(jax.random.key(1), 256, 0, 8)  # continuous, off the student grid
    assert len(np.unique(np.round(np.asarray(t), 6))) > 200
    np.testing.assert_allclose(t - m, 1 / 8, atol=1e-6)
    np.testing.assert_allclose(s, np.maximum(np.asarray(t) - 1 / 4, 0.0), atol=1e-6)


def test_spectral_norm_discriminator_trains_and_updates_its_power_iteration(tiny_text_teacher):
    """The reference's head (spectral norm, no final norm) in a jitted DiDi-Instruct step: the
    power-iteration vectors live in the state and move with the critic updates."""
    from tests.teachers import LANGUAGE, LENGTH

    config = synthetic_didi.get_config(f"{LANGUAGE},smoke")
    config.teacher.checkpoint = tiny_text_teacher
    config.data.length = LENGTH
    config.distill.update(disc_spectral_norm=True, disc_head_layernorm=False)
    method = didi.make_method(config)
    state0 = method.init(jax.random.key(0))
    assert set(state0.discriminator_stats) == {"sn_hidden", "sn_out"}
    assert "LayerNorm_0" not in state0.discriminator["head"]["params"]
    state, metrics = jax.jit(method.step)(
        state0, next(method.batches(0)), jax.random.key(1), jnp.int32(0)
    )
    assert all(np.isfinite(v) for v in jax.device_get(metrics).values())
    u0 = state0.discriminator_stats["sn_hidden"]["hidden/kernel/u"]
    u1 = state.discriminator_stats["sn_hidden"]["hidden/kernel/u"]
    assert not np.allclose(u0, u1)
