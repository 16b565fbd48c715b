"""MDLM teacher training, as a method for the training engine.

The teacher is a `DiT` denoiser over V + 1 ids (V tokens and [MASK] = V) trained on the MDLM
continuous-time NELBO (Sahoo et al. 2024; see `didistill.diffusion.masked`):

    L(theta) = (1/L) E_{x, t, z_t ~ q(.|x)} [ w(t) sum_{l: z_t^l = m} -log x_theta^l(z_t)[x^l] ]

(nats per token), with low-discrepancy t, the optimizer of `config.optim` and an EMA of the
weights, ema <- d ema + (1 - d) theta with d = min(ema_decay, (1 + step)/(10 + step)) when
`config.ema_warmup`.

Data: `config.data.kind = 'synthetic'` (a language of `didistill.data.text`, exact likelihood)
or 'tfds' (real text: a prepared tfds dataset and the byte or GPT-2 tokenizer), or 'tokens'
(real text pre-tokenised once into memory-mapped shards, `didistill.data.token_shards`).

`evaluate` (EMA params): draws `eval.num_samples` sequences with the cached ancestral sampler at
each of `eval.sample_steps`, reporting `steps{N}/gen_ppl`, `/entropy`, `/nfe` (and, for
synthetic data, `/invalid_rate`) under the exact source as judge (for tfds data, the judge
built by `eval.judge` = "package.module:factory" called as factory(config), or none: gen_ppl
NaN); the same for real held-out data (`data/...`); the held-out NELBO
(`heldout/nelbo_per_token`) against the source's exact per-token entropy of length-L
sequences (`source/entropy_per_token`; their difference is `heldout/nelbo_gap`, >= 0 up to
Monte Carlo noise and the O(eps) schedule bias); and saves the EMA params to
`<workdir>/teacher_params.msgpack` (`didistill.nets.files.save_model` / `load_teacher_denoiser`).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from didistill import compat
from didistill.data import text
from didistill.diffusion import masked
from didistill.distill.teachers.supervised import supervised_method
from didistill.eval import text as text_eval
from didistill.nets.dit import DiT, dit_from_config
from didistill.nets.files import load_model, save_model
from didistill.train.method import Method

TEACHER_FILE = "teacher_params.msgpack"
HELDOUT_SHARD = 2**31 - 1  # the rng tag of held-out data; no process index reaches it
logger = logging.getLogger(__name__)


def logits_fn_of(net: DiT, params) -> masked.LogitsFn:
    """The `logits_fn(z_t, t)` of a denoiser, for `didistill.diffusion.masked`."""
    return lambda xt, t: net.apply(params, xt, t)


_HOW_TO_CREATE = (
    "Train one first: python -m didistill.main --config=synthetic_mdlm:markov "
    f"--workdir=DIR (writes DIR/{TEACHER_FILE})."
)


def load_teacher_denoiser(path: str) -> tuple[DiT, Any, dict[str, Any]]:
    """(module, params, meta) of a saved teacher: logits = module.apply(params, z_t, t)."""
    return load_model(path, "dit", "MDLM teacher", _HOW_TO_CREATE)


def data_streams(config):
    """(vocab_size, language or None, train(start, n, shard) -> batches, heldout(n) -> batches)
    of `config.data`: a synthetic language, or a prepared tfds text dataset with its tokenizer
    (opened on first use; a missing tokenizer file or dataset stops with a message saying how
    to get it). Shared by the teacher and the text students."""
    d = config.data
    if d.kind == "synthetic":
        lang = text.get_language(d.language)
        train = lambda start, n, shard: text.batches(lang, config.seed, n, d.length, start, shard)
        heldout = lambda n: text.batches(lang, config.seed, n, d.length, 0, HELDOUT_SHARD)
        return lang.vocab_size, lang, train, heldout
    if d.kind == "tfds":
        tok = text.get_tokenizer(d.tokenizer, d.tokenizer_dir)
        framing = d.get("framing", "none")
        sources = {}  # opened on first use, so building the method needs no data

        def source(split):
            if split not in sources:
                sources[split] = text.load_tfds_text(d.tfds_name, split, d.tfds_data_dir or None)
            return sources[split]

        def train(start, n, shard):
            src = source(d.tfds_split)
            return text.text_batches(
                src, tok, config.seed, n, d.length, start, shard, d.text_key, framing
            )

        def heldout(n):
            src = source(d.heldout_split)
            return text.text_batches(src, tok, config.seed, n, d.length, 0, 0, d.text_key, framing)

        return tok.vocab_size, None, train, heldout
    if d.kind == "tokens":  # pre-tokenised shards (data/token_shards.py): no tokenizer here
        from didistill.data import token_shards

        framing = d.get("framing", "none")
        streams = {"train": token_shards.TokenStream(d.get("tokens_dir", ""))}

        def stream(name):
            if name not in streams:  # held-out shards opened on first use
                streams[name] = token_shards.TokenStream(d.get("heldout_tokens_dir", ""))
            return streams[name]

        def train(start, n, shard):
            return token_shards.token_batches(
                stream("train"), config.seed, n, d.length, start, shard, framing
            )

        def heldout(n):
            return token_shards.token_batches(
                stream("heldout"), config.seed, n, d.length, 0, 0, framing
            )

        return streams["train"].vocab_size, None, train, heldout
    raise ValueError(f"config.data.kind={d.kind!r} must be 'synthetic', 'tfds' or 'tokens'")


def external_judge(config):
    """The judge of `config.eval.judge` ("package.module:factory"), or None (with a warning
    saying what is missing when the factory cannot find its files: gen_ppl is then NaN)."""
    target = config.eval.get("judge", "")
    if not target:
        return None
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)(config)
    except FileNotFoundError as err:
        logger.warning("no judge (gen_ppl is NaN): %s", err)
        return None


def make_method(config) -> Method:
    """Builds the MDLM teacher method from a `configs/synthetic_mdlm.py`-style config."""
    vocab_size, lang, train_batches, heldout_batches = data_streams(config)
    mask_id, length = vocab_size, config.data.length
    net_cfg = dict(config.net, vocab_size=vocab_size, max_length=length)
    net = dit_from_config(net_cfg)
    dcfg, ecfg = config.diffusion, config.eval
    schedule = masked.get_schedule(dcfg.schedule, dcfg.eps)
    if ecfg.num_samples < 1 or not ecfg.sample_steps or min(ecfg.sample_steps) < 1:
        raise ValueError("config.eval needs num_samples >= 1 and sample_steps of ints >= 1")
    cache = not net.time_conditioning  # caching is exact only for a time-agnostic denoiser

    def init_params(key):
        return net.init(key, jnp.full((1, length), mask_id, jnp.int32), jnp.ones((1,)))

    def loss_fn(params, batch, key):
        tokens = batch["tokens"]
        k_nelbo, k_drop = jax.random.split(key)
        fn = lambda xt, t: net.apply(params, xt, t, train=True, rngs={"dropout": k_drop})
        per_seq = masked.nelbo(
            fn, k_nelbo, tokens, schedule, mask_id,
            t_min=dcfg.t_min, low_discrepancy=dcfg.low_discrepancy,
        )  # fmt: skip
        return jnp.mean(per_seq) / length

    def sample(params, key, num_steps):  # the shared cached sampler (the students' too)
        dtype = jnp.float64 if ecfg.float64 else jnp.float32
        return text_eval.ancestral_samples(
            net, params, key, num_steps, schedule, num_samples=ecfg.num_samples,
            batch_size=ecfg.batch_size, length=length, mask_id=mask_id, cache=cache, dtype=dtype,
        )  # fmt: skip

    def evaluate(state, key, workdir):
        ema_params = jax.device_get(state.ema_params)
        judge = (
            text_eval.exact_judge(lang, ecfg.judge_smoothing) if lang else external_judge(config)
        )
        report = lambda tokens, nfe: (
            text_eval.sample_report(tokens, judge, nfe, lang)
            if judge
            else {"gen_ppl": math.nan, "entropy": text_eval.unigram_entropy(tokens), "nfe": nfe}
        )
        if judge is None:
            logger.warning("no judge for real text (config.eval.judge): gen_ppl is NaN")
        results = {}
        n_batches = -(-ecfg.num_samples // ecfg.batch_size)
        data = np.concatenate(
            [b["tokens"] for b in itertools.islice(heldout_batches(ecfg.batch_size), n_batches)]
        )[: ecfg.num_samples]
        results.update({f"data/{k}": v for k, v in report(data, 0).items() if k != "nfe"})
        k_sample, k_nelbo = jax.random.split(key)
        with compat.enable_x64(True) if ecfg.float64 else contextlib.nullcontext():
            for num_steps in ecfg.sample_steps:
                tokens, nfe = sample(ema_params, jax.random.fold_in(k_sample, num_steps), num_steps)
                results.update({f"steps{num_steps}/{k}": v for k, v in report(tokens, nfe).items()})
        held = (
            b["tokens"]
            for b in itertools.islice(heldout_batches(ecfg.batch_size), ecfg.heldout_batches)
        )
        nelbo = text_eval.heldout_nelbo(
            logits_fn_of(net, ema_params), held, k_nelbo, schedule, mask_id,
            num_t=ecfg.num_t, t_min=dcfg.t_min,
        )  # fmt: skip
        results.update({f"heldout/{k}": v for k, v in nelbo.items()})
        if lang is not None:
            entropy = lang.entropy_per_token(length)
            results["source/entropy_per_token"] = entropy
            results["source/gen_ppl"] = math.exp(entropy)
            results["heldout/nelbo_gap"] = results["heldout/nelbo_per_token"] - entropy
        if jax.process_index() == 0:
            save_model(
                os.path.join(workdir, TEACHER_FILE),
                ema_params,
                net_cfg,
                "dit",
                data=dict(config.data),
                diffusion=dict(dcfg),
                eval={k: v for k, v in results.items() if not k.startswith("data/")},
            )
        return results

    def batches(start_step):
        local = config.train.batch_size // jax.process_count()
        return train_batches(start_step, local, jax.process_index())

    ema_warmup = bool(config.get("ema_warmup", False))
    return supervised_method(config, init_params, loss_fn, evaluate, batches, ema_warmup=ema_warmup)


__all__ = [
    "TEACHER_FILE",
    "data_streams",
    "external_judge",
    "load_teacher_denoiser",
    "logits_fn_of",
    "make_method",
]
