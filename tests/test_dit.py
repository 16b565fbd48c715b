"""Tests for didistill.nets.dit (the text DiT), and for the MDLM teacher method that trains it
(didistill.distill.teachers.mdlm, configs/synthetic_mdlm.py, configs/owt_mdlm.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from didistill.configs import owt_mdlm, synthetic_mdlm
from didistill.data import text
from didistill.diffusion import masked
from didistill.distill.teachers import mdlm as mdlm_teacher
from didistill.eval import text as text_eval
from didistill.nets.dit import DiT, apply_rotary, dit_from_config

V, L = 6, 8
SCHEDULE = masked.LogLinearSchedule()


def perturbed(params, key, scale=0.3):
    """params plus noise, so the zero-initialised heads and adaLN gates are active (one
    random draw for the whole tree: cheap to compile)."""
    flat, unravel = ravel_pytree(params)
    return unravel(flat + scale * jax.random.normal(key, flat.shape))


@pytest.fixture(scope="module")
def dit():
    """(jitted apply, perturbed params, tokens [3, L]) of a time-conditioned DiT."""
    net = DiT(vocab_size=V, max_length=L, width=16, depth=2, num_heads=2, time_conditioning=True)
    tokens = jax.random.randint(jax.random.key(0), (3, L), 0, V + 1)
    params = jax.jit(net.init)(jax.random.key(1), tokens, jnp.ones((3,)))
    return jax.jit(net.apply), perturbed(params, jax.random.key(2)), tokens


@pytest.fixture(scope="module")
def plain():
    """(module, initial params) of a DiT without time conditioning, with dropout 0.5."""
    net = DiT(vocab_size=V, max_length=L, width=16, depth=2, num_heads=2, dropout=0.5)
    return net, jax.jit(net.init)(jax.random.key(0), jnp.full((2, L), V))


class TestRotary:
    def test_scores_depend_on_relative_position_only(self):
        q, k = jax.random.normal(jax.random.key(0), (2, 1, 5, 2, 8))
        pos = jnp.arange(5)
        score = jax.jit(
            lambda p: jnp.einsum("blhd,bmhd->bhlm", apply_rotary(q, p), apply_rotary(k, p))
        )
        np.testing.assert_allclose(score(pos), score(pos + 13), atol=1e-4)
        assert not np.allclose(score(pos), score(2 * pos), atol=1e-3)

    def test_is_a_rotation(self):
        x = jax.random.normal(jax.random.key(1), (2, 4, 3, 6))
        rotate = jax.jit(apply_rotary)
        y = rotate(x, jnp.arange(4) * 7)
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), 1e-5)
        np.testing.assert_allclose(rotate(x, jnp.zeros(4)), x, atol=1e-7)


class TestDiT:
    def test_shapes_and_zero_initial_logits(self, plain):
        net, params = plain
        tokens = jnp.full((2, L), V)
        apply = jax.jit(net.apply, static_argnames="return_hidden")
        logits = apply(params, tokens)
        assert logits.shape == (2, L, V + 1) and logits.dtype == jnp.float32
        assert float(jnp.abs(logits).max()) == 0.0  # zero-initialised output layer
        logits2, hidden = apply(params, tokens, return_hidden=2)
        assert hidden.shape == (2, 2, L, 16)
        np.testing.assert_array_equal(logits, logits2)

    def test_bidirectional_and_position_aware(self, dit):
        apply, params, tokens = dit
        t = jnp.full((3,), 0.5)
        base = apply(params, tokens, t)
        changed_last = apply(params, tokens.at[:, -1].set((tokens[:, -1] + 1) % V), t)
        assert not np.allclose(base[:, 0], changed_last[:, 0])  # position 0 sees the future
        swapped = tokens.at[:, 0].set(tokens[:, 1]).at[:, 1].set(tokens[:, 0])
        out = apply(params, swapped, t)
        assert not np.allclose(out[:, 0], base[:, 1], atol=1e-4)  # positions matter

    def test_soft_one_hot_tokens_equal_ids(self, dit):
        apply, params, tokens = dit
        t = jnp.full((3,), 0.3)
        soft = jax.nn.one_hot(tokens, V + 1)
        np.testing.assert_allclose(apply(params, soft, t), apply(params, tokens, t), atol=1e-5)

    def test_time_conditioning(self, dit):
        apply, params, tokens = dit
        a, b = (apply(params, tokens, jnp.full((3,), t)) for t in (0.1, 0.9))
        assert not np.allclose(a, b, atol=1e-4)
        with pytest.raises(ValueError, match="needs the diffusion time"):
            apply(params, tokens)

    def test_no_time_conditioning_ignores_t_and_dropout_acts_in_training(self, plain):
        net, params = plain
        params = perturbed(params, jax.random.key(1))
        tokens = jnp.zeros((2, L), jnp.int32)
        apply = jax.jit(net.apply)
        np.testing.assert_array_equal(
            apply(params, tokens, jnp.zeros(2)), apply(params, tokens, jnp.ones(2))
        )
        run = jax.jit(lambda k: net.apply(params, tokens, train=True, rngs={"dropout": k}))
        assert not np.allclose(run(jax.random.key(2)), run(jax.random.key(3)))

    def test_bad_sizes(self):
        tokens = jnp.zeros((1, L), jnp.int32)
        with pytest.raises(ValueError, match="even size"):
            DiT(vocab_size=V, width=18, num_heads=2).init(jax.random.key(0), tokens)
        with pytest.raises(ValueError, match="max_length"):
            DiT(vocab_size=V, max_length=4, width=16, num_heads=2).init(jax.random.key(0), tokens)


# --- The MDLM teacher method ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke():
    config = synthetic_mdlm.get_config("markov_small,smoke")
    method = mdlm_teacher.make_method(config)
    return config, method, jax.jit(method.step)


class TestConfigs:
    def test_arguments(self):
        config = synthetic_mdlm.get_config("hmm")
        assert config.data.language == "hmm" and config.method == "mdlm_teacher"
        assert synthetic_mdlm.get_config(None).data.language == "markov"
        assert synthetic_mdlm.get_config("hmm_small,smoke").train.num_steps < 50
        with pytest.raises(ValueError, match="synthetic_mdlm config arg"):
            synthetic_mdlm.get_config("markov,fast")

    def test_owt_published_settings(self):
        c = owt_mdlm.get_config()
        assert (c.data.kind, c.data.tokenizer, c.data.length) == ("tfds", "gpt2", 1024)
        assert (c.net.depth, c.net.width, c.net.num_heads) == (12, 768, 12)
        assert (c.optim.name, c.optim.learning_rate, c.optim.warmup_steps) == ("adamw", 3e-4, 2500)
        assert (c.train.batch_size, c.train.num_steps, c.ema_decay) == (512, 1_000_000, 0.9999)
        assert not c.net.time_conditioning


class TestTeacher:
    def test_step_and_short_run_lowers_the_loss(self, smoke):
        config, method, step = smoke
        lang = text.get_language("markov_small")
        net = dit_from_config(dict(config.net, vocab_size=8, max_length=16))
        held = [lang.sample(np.random.default_rng(99), 256, config.data.length)]

        def heldout(params):  # low-noise NELBO per token: 256 sequences x 4 (t, mask) draws
            fn = mdlm_teacher.logits_fn_of(net, params)
            out = text_eval.heldout_nelbo(fn, held, jax.random.key(0), SCHEDULE, 8, num_t=4)
            return out["nelbo_per_token"]

        state = jax.jit(method.init)(jax.random.key(0))
        batch = next(method.batches(0))
        assert batch["tokens"].shape == (config.train.batch_size, config.data.length)
        before = heldout(state.params)
        assert before == pytest.approx(np.log(8), rel=0.05)  # uniform logits at init: log V
        for i, batch in zip(range(80), method.batches(0), strict=False):
            state, metrics = step(state, batch, jax.random.key(i + 1), jnp.int32(i))
            assert all(np.isfinite(float(v)) for v in metrics.values())
        assert set(metrics) >= {"loss", "grad_norm", "ema_decay"}
        assert heldout(state.params) < 0.93 * before

    def test_evaluate_reports_and_saves(self, smoke, tmp_path):
        config, method, step = smoke
        state = jax.jit(method.init)(jax.random.key(0))
        state, _ = step(state, next(method.batches(0)), jax.random.key(1), jnp.int32(0))
        results = method.evaluate(state, jax.random.key(2), str(tmp_path))
        for n in config.eval.sample_steps:
            assert {"gen_ppl", "entropy", "nfe"} <= {k.split("/")[1] for k in results if
                                                     k.startswith(f"steps{n}/")}  # fmt: skip
            assert 1 <= results[f"steps{n}/nfe"] <= n
        assert results["source/entropy_per_token"] > 0 and "heldout/nelbo_gap" in results
        net, params, meta = mdlm_teacher.load_teacher_denoiser(
            str(tmp_path / mdlm_teacher.TEACHER_FILE)
        )
        assert meta["data"]["language"] == "markov_small" and net.vocab_size == 8
        tokens = jnp.full((1, config.data.length), 8)
        apply = jax.jit(net.apply)
        np.testing.assert_allclose(
            apply(params, tokens), apply(state.ema_params, tokens), atol=1e-6
        )

    def test_load_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="synthetic_mdlm"):
            mdlm_teacher.load_teacher_denoiser(str(tmp_path / "none.msgpack"))
        bad = tmp_path / "bad.msgpack"
        bad.write_bytes(b"not msgpack")
        with pytest.raises(ValueError, match="not a readable MDLM teacher file"):
            mdlm_teacher.load_teacher_denoiser(str(bad))
