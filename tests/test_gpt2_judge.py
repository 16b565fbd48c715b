"""GPT-2 judge: the Flax GPT-2 converted from a Hugging Face layout checkpoint (written here as
safetensors) matches a NumPy forward pass, and generative perplexity follows MDLM's protocol.

NumPy restatements: huggingface/transformers @ 0010f60 src/transformers/models/gpt2/
modeling_gpt2.py (`GPT2Attention._attn`: scaled scores, causal mask and additive padding mask at
finfo.min, softmax; `GPT2MLP` with gelu_new; `GPT2Block` pre-LN residuals; `GPT2Model`: wte +
wpe, ln_f; tied LM head); kuleshov-group/mdlm @ c112c52 diffusion.py 474-573 (retokenise,
batches of min(8, N) with the remainder dropped, chunks of 1024, cross-entropy of next tokens
weighted by first-EOS-or-not-EOS, exp of the ratio of sums).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from didistill.data import text
from didistill.eval import text as text_eval
from didistill.eval.gen_ppl import GPT2Judge, gpt2_judge, retokenize
from didistill.nets.gpt2 import gpt2_to_params, load_gpt2
from didistill.nets.safetensors_io import write_safetensors

V, P, D, H, DEPTH = 257, 32, 16, 2, 2  # bytes + <|endoftext|>, positions, width, heads, layers


def _hf_state(seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.2 * rng.normal(size=shape)).astype(np.float32)
    sd = {"transformer.wte.weight": w(V, D), "transformer.wpe.weight": w(P, D),
          "transformer.ln_f.weight": 1 + w(D), "transformer.ln_f.bias": w(D)}  # fmt: skip
    for i in range(DEPTH):
        h = f"transformer.h.{i}"
        sd.update({
            f"{h}.ln_1.weight": 1 + w(D), f"{h}.ln_1.bias": w(D),
            f"{h}.ln_2.weight": 1 + w(D), f"{h}.ln_2.bias": w(D),
            f"{h}.attn.c_attn.weight": w(D, 3 * D), f"{h}.attn.c_attn.bias": w(3 * D),
            f"{h}.attn.c_proj.weight": w(D, D), f"{h}.attn.c_proj.bias": w(D),
            f"{h}.mlp.c_fc.weight": w(D, 4 * D), f"{h}.mlp.c_fc.bias": w(4 * D),
            f"{h}.mlp.c_proj.weight": w(4 * D, D), f"{h}.mlp.c_proj.bias": w(D),
            f"{h}.attn.bias": np.tril(np.ones((P, P), bool))[None, None],
        })  # fmt: skip
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def _ln(x, g, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b


def hf_gpt2_logits(sd, ids, mask):
    """GPT2LMHeadModel forward in float64: ids [B, T], mask [B, T] -> logits [B, T, V]."""
    sd = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in sd.items()}
    batch, length = ids.shape
    d = D // H
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:length]
    additive = (1.0 - mask[:, None, None, :]) * np.finfo(np.float64).min  # GPT2Model
    causal = np.tril(np.ones((length, length), bool))
    for i in range(DEPTH):
        p = lambda k, i=i: sd[f"h.{i}.{k}"]
        h = _ln(x, p("ln_1.weight"), p("ln_1.bias"))
        qkv = h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = (
            t.reshape(batch, length, H, d).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, -1)
        )
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        with np.errstate(over="ignore"):  # finfo.min + finfo.min = -inf, as in torch
            scores = np.where(causal, scores, np.finfo(np.float64).min) + additive
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attn = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, D)
        x = x + attn @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = _ln(x, p("ln_2.weight"), p("ln_2.bias")) @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # gelu_new
        x = x + h @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return _ln(x, sd["ln_f.weight"], sd["ln_f.bias"]) @ sd["wte.weight"].T


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    write_safetensors(str(root / "model.safetensors"), _hf_state())
    byte_map = text._byte_to_unicode()
    encoder = {byte_map[b]: b for b in range(256)}
    encoder[text.GPT2Tokenizer.EOS] = 256
    import json

    (root / "vocab.json").write_text(json.dumps(encoder))
    (root / "merges.txt").write_text("#version: 0.2\n")
    (root / "config.json").write_text(json.dumps({"n_head": H}))
    return root


def test_flax_gpt2_matches_numpy_forward(judge_dir):
    model, variables = load_gpt2(str(judge_dir))
    assert (model.width, model.depth, model.num_heads, model.vocab_size) == (D, DEPTH, H, V)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, 12))
    mask = np.ones((3, 12), np.int32)
    mask[1, 7:] = 0  # right padding
    ours = np.asarray(model.apply(variables, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_gpt2_logits(_hf_state(), ids, mask)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)


def _mdlm_gen_ppl(tokens, tokenizer, sd, max_length, context, batch_size):
    """MDLM's `compute_generative_perplexity` on decoded samples, NumPy."""
    texts = [tokenizer.decode(row) for row in tokens]
    ids, mask = retokenize(texts, tokenizer, max_length)
    b = min(batch_size, len(ids))
    total, weight = 0.0, 0.0
    for i in range(len(ids) // b):
        for lo in range(0, ids.shape[1], context):
            chunk, m = (
                ids[i * b : (i + 1) * b, lo : lo + context],
                mask[i * b : (i + 1) * b, lo : lo + context],
            )
            logits = hf_gpt2_logits(sd, chunk, m)[:, :-1]
            logp = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True)
            )
            nll = -np.take_along_axis(logp, chunk[:, 1:, None], -1)[..., 0]
            first_eos = np.cumsum(chunk == 256, -1) == 1
            valid = first_eos[:, 1:] | (chunk != 256)[:, 1:]  # torch bool '+' is 'or'
            total += np.sum(nll * valid)
            weight += np.sum(valid)
    return math.exp(total / weight)


def test_generative_perplexity_follows_mdlm(judge_dir):
    model, variables = load_gpt2(str(judge_dir))
    tok = text.GPT2Tokenizer.from_dir(str(judge_dir))
    rng = np.random.default_rng(2)
    tokens = rng.integers(97, 123, (7, 20))  # ASCII letters
    tokens[0, 5] = tokens[0, 12] = tokens[3, 0] = 256  # EOS in the middle and at the start
    tokens[4, 10:] = 256  # a sample that ends early
    judge = GPT2Judge(model, variables, tok, tok, max_length=18, context=8, batch_size=3)
    nll, count = judge(tokens)
    assert np.all(count[6:] == 0) and np.all(count[:6] > 0)  # 7 = 2 x 3 + 1 dropped
    ours = text_eval.generative_perplexity(tokens, judge)
    ref = _mdlm_gen_ppl(tokens, tok, _hf_state(), 18, 8, 3)
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    report = text_eval.sample_report(tokens, judge, nfe=16)
    assert report["nfe"] == 16 and report["entropy"] == pytest.approx(
        text_eval.unigram_entropy(tokens)
    )


def test_retokenize_reads_endoftext_as_eos_and_pads_with_it(judge_dir):
    tok = text.GPT2Tokenizer.from_dir(str(judge_dir))
    ids, mask = retokenize(["ab<|endoftext|>c", "abcdef"], tok, max_length=5)
    np.testing.assert_array_equal(ids, [[97, 98, 256, 99, 256], [97, 98, 99, 100, 101]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def test_missing_files_and_bad_checkpoints_are_one_line_errors(tmp_path):
    config = type("C", (), {})()
    config.eval = {"judge_dir": ""}
    with pytest.raises(FileNotFoundError, match="config.eval.judge_dir is empty"):
        gpt2_judge(config)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_gpt2(str(tmp_path))
    sd = _hf_state()
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match="lacks 'h.1.mlp.c_fc.bias'"):
        gpt2_to_params(sd, num_heads=H)
    with pytest.raises(ValueError, match="pass num_heads"):
        gpt2_to_params(_hf_state())  # width 16 is no public size
