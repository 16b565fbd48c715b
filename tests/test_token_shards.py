"""Pre-tokenised shards (`data/token_shards.py`): written once from a tiny corpus, read back as
MDLM-packed blocks without the tokenizer, used by a text student; one-line errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.configs import synthetic_sdtt
from didistill.data import text, token_shards
from didistill.distill.discrete import step_halving
from didistill.nets.dit import dit_from_config
from didistill.nets.files import save_model

DOCS = [{"text": t} for t in ("the cat sat", "a dog ran far", "hello world", "zz top", "é!")]


def _stream():  # the document stream by hand: each document's bytes, then EOS (256)
    return [b for d in DOCS for b in [*d["text"].encode("utf-8"), 256]]


@pytest.fixture
def shards(tmp_path):
    folder = str(tmp_path / "tokens")
    meta = token_shards.write_shards(DOCS, text.ByteTokenizer(), folder, shard_tokens=7)
    return folder, meta


def test_write_and_read_back(shards):
    folder, meta = shards
    expected = _stream()
    assert meta["num_tokens"] == len(expected) and meta["num_documents"] == len(DOCS)
    assert len(meta["shards"]) == -(-len(expected) // 7) and meta["dtype"] == "uint16"
    stream = token_shards.TokenStream(folder)
    assert (stream.vocab_size, stream.eos_id, len(stream)) == (258, 256, len(expected))
    np.testing.assert_array_equal(stream.slice(0, len(expected)), expected)
    np.testing.assert_array_equal(stream.slice(5, 23), expected[5:23])  # across shards
    with open(os.path.join(folder, token_shards.META)) as f:
        assert json.load(f)["shards"] == meta["shards"]


@pytest.mark.parametrize("framing", ["mdlm", "none"])
def test_batches_are_framed_blocks_without_the_tokenizer(shards, framing, monkeypatch):
    folder, _ = shards
    stream = token_shards.TokenStream(folder)

    def no_tokenizer(*args):
        raise AssertionError("the tokenizer ran in the input pipeline")

    monkeypatch.setattr(text.ByteTokenizer, "encode", no_tokenizer)
    length = 10
    body = length - 2 if framing == "mdlm" else length
    expected = np.asarray(_stream())
    blocks = [expected[b * body : (b + 1) * body] for b in range(len(expected) // body)]
    batches = token_shards.token_batches(stream, 0, 6, length, framing=framing)
    first = [next(batches)["tokens"] for _ in range(4)]
    for batch in first:
        assert batch.shape == (6, length) and batch.dtype == np.int32
        for row in batch:
            core = row[1:-1] if framing == "mdlm" else row
            assert any(np.array_equal(core, b) for b in blocks)
            if framing == "mdlm":
                assert row[0] == row[-1] == 256
    resumed = next(token_shards.token_batches(stream, 0, 6, length, start_step=3, framing=framing))
    np.testing.assert_array_equal(resumed["tokens"], first[3])


def _byte_teacher(tmp_path, length):
    cfg = dict(vocab_size=258, max_length=length, width=16, depth=1, num_heads=2, cond_dim=8)
    net = dit_from_config(cfg)
    params = net.init(jax.random.key(0), jnp.full((1, length), 258, jnp.int32))
    return save_model(str(tmp_path / "t.msgpack"), params, cfg, "dit",
                      diffusion={"schedule": "loglinear", "eps": 1e-3})  # fmt: skip


def test_a_student_trains_on_shards(shards, tmp_path):
    folder, _ = shards
    config = synthetic_sdtt.get_config("markov,smoke")
    config.teacher.checkpoint = _byte_teacher(tmp_path, 12)
    config.data.update(kind="tokens", tokens_dir=folder, heldout_tokens_dir=folder, length=12,
                       framing="mdlm")  # fmt: skip
    config.eval.update(num_samples=4, batch_size=4, sample_steps=(2,))
    method = step_halving.make_method(config)
    batch = next(method.batches(0))
    assert batch["tokens"].shape == (config.train.batch_size, 12)
    state = method.init(jax.random.key(0))
    _, metrics = jax.jit(method.step)(state, batch, jax.random.key(1), jnp.int32(0))
    assert all(np.isfinite(v) for v in jax.device_get(metrics).values())


def test_errors_say_what_to_do(shards, tmp_path, capsys):
    folder, _ = shards
    with pytest.raises(FileNotFoundError, match=r"tokens.json missing\): write it once with"):
        token_shards.TokenStream(str(tmp_path / "nowhere"))
    os.remove(os.path.join(folder, "tokens_00001.npy"))
    with pytest.raises(FileNotFoundError, match="tokens_00001.npy is missing"):
        token_shards.TokenStream(folder)
    with pytest.raises(SystemExit) as exit_info:
        token_shards.main(["--tfds_name=x", f"--out={tmp_path / 'o'}", "--tokenizer=gpt2",
                           f"--tokenizer_dir={tmp_path / 'no_gpt2'}"])  # fmt: skip
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vocab.json" in err and "config.data.tokenizer_dir" in err


def test_short_stream_and_bad_framing(tmp_path):
    folder = str(tmp_path / "short")
    token_shards.write_shards(["ab"], text.ByteTokenizer(), folder)
    stream = token_shards.TokenStream(folder)
    with pytest.raises(ValueError, match="fewer than one block of 8"):
        next(token_shards.token_batches(stream, 0, 2, 10, framing="mdlm"))
    with pytest.raises(ValueError, match="config.data.framing='x'"):
        next(token_shards.token_batches(stream, 0, 2, 3, framing="x"))
