"""The text-student scaffold: what every few-step student of an MDLM teacher starts from.

A text student (DiDi-Instruct, `didi`; step halving, `step_halving`) distils a saved MDLM
teacher (`didistill.distill.teachers.mdlm`, Sahoo et al. 2024, arXiv:2406.07524): a `DiT`
denoiser x_theta(z_t, t) over V + 1 ids (V tokens, [MASK] = m = V) trained on the masked
diffusion q(z_t^l | x^l) = alpha_t 1[z_t^l = x^l] + (1 - alpha_t) 1[z_t^l = m]. The student has
the teacher's architecture and starts from its params; what it inherits from the teacher file:

- the network, params and meta, checked against the config: `config.teacher.checkpoint` set, the
  method's own config checks (`validate(net)`), then the data's vocabulary V (the synthetic
  language's, or the tokenizer's for `config.data.kind='tfds'`, real text: a prepared tfds
  dataset, or the shards' for `kind='tokens'`, pre-tokenised text, `mdlm.data_streams`) and
  the sequence length L <= the teacher's `max_length`;
- the schedule alpha_t (name and eps of the teacher's `diffusion` meta; log-linear, eps = 1e-3
  when absent), the mask id V, and whether the ancestral sampler may cache the network (exact
  only for a time-agnostic denoiser, alpha_t entering x_theta only through z_t);
- sampling: `text_eval.ancestral_sampler`, the library's one jitted ancestral sampler on the
  grid t_i = 1 - i/N, shared with the teacher's own evaluation (teacher and student at N steps
  share one compilation);
- evaluation: the exact judge of the synthetic source (real text: the judge of
  `config.eval.judge`, e.g. GPT-2 Large, `didistill.eval.gen_ppl:gpt2_judge`; none: gen_ppl
  NaN, entropy and NFE still reported), the report of held-out data (`data/...`) and of the
  student and teacher samples at each of `eval.sample_steps` (`student/steps{N}/...`,
  `teacher/steps{N}/...`, same keys for both: paired comparisons), and the source's exact
  perplexity exp(H(X_{1:L}) / L) (`source/gen_ppl`, synthetic only);
- the data stream: the training batches of the synthetic language or of the tfds text.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from didistill.data import text
from didistill.diffusion import masked
from didistill.distill.teachers.mdlm import (
    HELDOUT_SHARD,
    data_streams,
    external_judge,
    load_teacher_denoiser,
    logits_fn_of,
)
from didistill.eval import text as text_eval
from didistill.nets.dit import DiT


@dataclasses.dataclass(frozen=True, eq=False)
class TextStudent:
    """A loaded, checked MDLM teacher and the sampling and evaluation of its students."""

    config: Any
    net: DiT
    teacher_params: Any
    meta: dict[str, Any]
    lang: text.Language | None  # None for real text
    schedule: masked.Schedule
    train_stream: Callable[[int, int, int], Iterator[dict[str, np.ndarray]]]
    heldout_stream: Callable[[int], Iterator[dict[str, np.ndarray]]]

    @property
    def length(self) -> int:
        """L, the sequence length of `config.data` (<= the teacher's max_length)."""
        return self.config.data.length

    @property
    def mask_id(self) -> int:
        """The id of [MASK]: V, the teacher's vocabulary size."""
        return self.net.vocab_size

    @property
    def cache(self) -> bool:
        """Whether the ancestral sampler may skip the network when no token changed."""
        return not self.net.time_conditioning

    def logits_fn(self, params) -> masked.LogitsFn:
        """`logits_fn(z_t, t)` [B, L, V + 1] of the network with `params` (student or teacher)."""
        return logits_fn_of(self.net, params)

    def teacher_copy(self):
        """A fresh copy of the teacher params (the student's initialisation)."""
        return jax.tree.map(jnp.array, self.teacher_params)

    def sample(self, params, key, num_steps: int):
        """(tokens [eval.num_samples, L], NFE) of the cached ancestral sampler at `num_steps`."""
        ecfg = self.config.eval
        return text_eval.ancestral_samples(
            self.net, params, key, num_steps, self.schedule, num_samples=ecfg.num_samples,
            batch_size=ecfg.batch_size, length=self.length, mask_id=self.mask_id,
            cache=self.cache,
        )  # fmt: skip

    def evaluate_prelude(self, student_params, key) -> tuple[text_eval.Judge, dict[str, Any]]:
        """(judge, results): the exact judge and the reports of held-out data (`data/...`) and
        of the student and teacher samples at every `eval.sample_steps`."""
        ecfg, lang = self.config.eval, self.lang
        if lang is not None:
            judge = text_eval.exact_judge(lang, ecfg.judge_smoothing)
            rng = np.random.default_rng([self.config.seed, HELDOUT_SHARD])
            data = lang.sample(rng, ecfg.num_samples, self.length)
        else:
            judge = external_judge(self.config)
            stream = self.heldout_stream(ecfg.batch_size)
            chunks = [
                next(stream)["tokens"] for _ in range(-(-ecfg.num_samples // ecfg.batch_size))
            ]
            data = np.concatenate(chunks)[: ecfg.num_samples]
        results = {f"data/{k}": v for k, v in text_eval.sample_report(data, judge, 0, lang).items()}
        models = {"student": student_params, "teacher": self.teacher_params}
        results.update(
            text_eval.reports_at_steps(self.sample, models, key, ecfg.sample_steps, judge, lang)
        )
        return judge, results

    def source_report(self) -> dict[str, float]:
        """{'source/gen_ppl': exp(H(X_{1:L}) / L)}, the perplexity of perfect samples ({} for
        real text)."""
        if self.lang is None:
            return {}
        return {"source/gen_ppl": math.exp(self.lang.entropy_per_token(self.length))}

    def batches(self, start_step: int, rows: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's training batches from `start_step`: {'tokens': int32 [B, L]} with B
        = train.batch_size / processes, or [B, rows, L] (rows sequences per example) when
        rows >= 1."""
        local = self.config.train.batch_size // jax.process_count()
        shard = jax.process_index()
        if rows < 1:
            return self.train_stream(start_step, local, shard)
        stream = self.train_stream(start_step, local * rows, shard)
        return ({"tokens": b["tokens"].reshape(local, rows, self.length)} for b in stream)


def load(config, validate: Callable[[DiT], None] = lambda net: None) -> TextStudent:
    """The `TextStudent` of `config.teacher.checkpoint`; `validate(net)` checks the method's own
    config once the teacher's network is known. Raises ValueError (or FileNotFoundError for a
    missing teacher file) saying what to set."""
    if not config.teacher.checkpoint:
        raise ValueError(
            "config.teacher.checkpoint is empty: point it at a teacher_params.msgpack written by "
            "configs/synthetic_mdlm.py (python -m didistill.main "
            "--config=synthetic_mdlm:LANGUAGE --workdir=DIR)"
        )
    net, teacher_params, meta = load_teacher_denoiser(config.teacher.checkpoint)
    validate(net)
    vocab_size, lang, train_stream, heldout_stream = data_streams(config)
    length = config.data.length
    if vocab_size != net.vocab_size or length > net.max_length:
        if lang:
            source = f"language {config.data.language!r}"
        elif config.data.kind == "tokens":
            source = f"token shards {config.data.get('tokens_dir', '')!r}"
        else:
            source = f"tokenizer {config.data.tokenizer!r}"
        raise ValueError(
            f"config.data ({source}, V={vocab_size}, length {length}) does not fit the teacher "
            f"(V={net.vocab_size}, max_length {net.max_length}); use the data and length the "
            "teacher was trained on"
        )
    dcfg = meta.get("diffusion", {})
    schedule = masked.get_schedule(dcfg.get("schedule", "loglinear"), dcfg.get("eps", 1e-3))
    return TextStudent(
        config, net, teacher_params, meta, lang, schedule, train_stream, heldout_stream
    )


__all__ = ["TextStudent", "load"]
