"""Real text (config.data.kind='tfds') in the text students: DiDi-Instruct and step halving train
and evaluate on a tokenised text source (a tiny in-memory stand-in for a prepared tfds dataset,
byte tokenizer), with an external judge; MDLM's BOS/EOS block framing; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import synthetic_didi, synthetic_sdtt
from didistill.data import text
from didistill.distill.discrete import didi, step_halving
from didistill.nets.dit import dit_from_config
from didistill.nets.files import save_model

LENGTH = 12
DOCS = [{"text": t} for t in ("the cat sat", "a dog ran far", "hello world", "zz top")]


def length_judge(config):
    """An external judge factory (config.eval.judge): nll = 0.1 per token."""
    del config
    return lambda tokens: 0.1 * np.full(len(tokens), np.asarray(tokens).shape[1], np.float64)


@pytest.fixture
def byte_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "load_tfds_text", lambda name, split, data_dir=None: DOCS)
    cfg = dict(vocab_size=258, max_length=LENGTH, width=16, depth=1, num_heads=2, cond_dim=8)
    net = dit_from_config(cfg)
    params = net.init(jax.random.key(0), jnp.full((1, LENGTH), 258, jnp.int32))
    return save_model(str(tmp_path / "t.msgpack"), params, cfg, "dit",
                      diffusion={"schedule": "loglinear", "eps": 1e-3})  # fmt: skip


def _real(config, teacher):
    config.teacher.checkpoint = teacher
    config.data.update(kind="tfds", tfds_name="fake", tokenizer="bytes", length=LENGTH,
                       framing="mdlm")  # fmt: skip
    config.eval.update(num_samples=4, batch_size=4, sample_steps=(2,),
                       judge="tests.test_text_real:length_judge")  # fmt: skip
    return config


@pytest.mark.parametrize("name", ["didi", "sdtt"])
def test_text_students_train_and_evaluate_on_real_text(byte_teacher, tmp_path, name):
    if name == "didi":
        config = _real(synthetic_didi.get_config("markov,smoke"), byte_teacher)
        config.distill.teacher_sample_steps = 2
        method = didi.make_method(config)
    else:
        config = _real(synthetic_sdtt.get_config("markov,smoke"), byte_teacher)
        method = step_halving.make_method(config)
    state = method.init(jax.random.key(0))
    batch = next(method.batches(0))
    tokens = batch["tokens"]
    assert tokens.shape[-1] == LENGTH and np.all(tokens[..., 0] == 256)  # BOS (= EOS id)
    state, metrics = jax.jit(method.step)(state, batch, jax.random.key(1), jnp.int32(0))
    assert all(np.isfinite(v) for v in jax.device_get(metrics).values())
    results = method.evaluate(state, jax.random.key(2), str(tmp_path))
    assert results["student/steps2/gen_ppl"] == pytest.approx(np.exp(0.1))
    assert np.isfinite(results["data/entropy"]) and "source/gen_ppl" not in results
    assert "student/steps2/invalid_rate" not in results


def test_without_a_judge_gen_ppl_is_nan_but_entropy_and_nfe_are_reported(byte_teacher, tmp_path):
    config = _real(synthetic_sdtt.get_config("markov,smoke"), byte_teacher)
    config.eval.judge = ""
    method = step_halving.make_method(config)
    results = method.evaluate(method.init(jax.random.key(0)), jax.random.key(1), str(tmp_path))
    assert np.isnan(results["teacher/steps2/gen_ppl"])
    assert results["teacher/steps2/nfe"] >= 1 and np.isfinite(results["teacher/steps2/entropy"])


def test_mdlm_framing_and_errors(byte_teacher):
    tok = text.ByteTokenizer()
    row = next(text.text_batches(DOCS, tok, 0, 1, 10, framing="mdlm"))["tokens"][0]
    assert row[0] == row[-1] == tok.eos_id and len(row) == 10
    plain = next(text.text_batches(DOCS, tok, 0, 1, 8))["tokens"][0]
    np.testing.assert_array_equal(row[1:-1], plain)  # same document stream, framed
    with pytest.raises(ValueError, match="config.data.framing='x'"):
        next(text.text_batches(DOCS, tok, 0, 1, 8, framing="x"))
    config = _real(synthetic_didi.get_config("markov,smoke"), byte_teacher)
    config.data.update(tokenizer="gpt2", tokenizer_dir="")
    with pytest.raises(FileNotFoundError, match="set config.data.tokenizer_dir"):
        didi.make_method(config)


def test_owt_presets_are_valid():
    from didistill.configs import owt_didi, owt_mdlm
    from didistill.train.optim import make_optimizer

    config = owt_didi.get_config()
    didi.validate(config, depth=12)
    for block in (config.optim_student, config.optim_discriminator):
        make_optimizer(block, total_steps=config.train.num_steps)
    assert (config.data.kind, config.data.length, config.data.framing) == ("tfds", 1024, "mdlm")
    assert config.distill.disc_spectral_norm and not config.distill.disc_head_layernorm
    assert config.eval.guided.enabled and config.eval.judge.endswith(":gpt2_judge")
    teacher = owt_mdlm.get_config()
    assert teacher.train.batch_size % teacher.train.grad_accum_steps == 0
    assert teacher.data.framing == "mdlm"
