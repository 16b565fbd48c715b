"""Generative perplexity of text samples under a GPT-2 judge, computed as MDLM and DUO do.

Protocol (kuleshov-group/mdlm @ c112c52, diffusion.py `eval_retokenize` 474-512 and
`compute_generative_perplexity` 515-573; the DUO copy in haoyangzheng-ai/didi-instruct @
7825a02 metrics.py `_eval_retokenize` 113-153, `record_generative_perplexity` 164-210):

1. decode each sample with the diffusion model's tokenizer (EOS ids become the text
   '<|endoftext|>'), re-encode with the judge's tokenizer ('<|endoftext|>' back to EOS),
   truncate to `max_length` (the model length, 1024) and right-pad every sample to the longest
   with EOS (GPT-2 has no pad token; padding is masked out of attention);
2. batches of b = min(batch_size, N) samples (MDLM's `perplexity_batch_size`, 8), the first
   floor(N / b) batches only (a remainder of N mod b samples is not judged, as in MDLM);
3. each batch is cut along the length into chunks of `context` (1024) tokens, judged
   independently; in a chunk c_0..c_{T-1}, token i >= 1 costs nll_i = -log p(c_i | c_<i)
   and counts with weight w_i = 1[c_i != EOS] + 1[c_i is the chunk's first EOS]
   (so the first EOS is predicted, padding and later EOS are not);
4. gen_ppl = exp( sum w_i nll_i / sum w_i ) over everything judged (`text.generative_perplexity`
   of the (nll, count) pairs this judge returns per sample).

The report is always `text.sample_report`: gen_ppl with the samples' unigram entropy (of the
diffusion tokens, MDLM's `record_entropy`) and the NFE that drew them.

`gpt2_judge(config)` is the factory for `config.eval.judge =
"didistill.eval.gen_ppl:gpt2_judge"`: GPT-2 weights and tokenizer files from
`config.eval.judge_dir` (model.safetensors, config.json, vocab.json, merges.txt), the
samples' tokenizer from `config.data.tokenizer` / `tokenizer_dir`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EOS_TEXT = "<|endoftext|>"


def encode_with_eos(tokenizer, text: str) -> list[int]:
    """Ids of `text` with every '<|endoftext|>' read as the EOS id (HF's special token)."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(EOS_TEXT)):
        if i:
            ids.append(tokenizer.eos_id)
        if piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def retokenize(texts, tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, T], attention mask int32 [N, T]): truncated to max_length, right-padded
    with EOS to the longest (T), mask 1 on tokens (MDLM's `eval_retokenize`)."""
    rows = [encode_with_eos(tokenizer, t)[:max_length] for t in texts]
    width = max(1, max(len(r) for r in rows))
    ids = np.full((len(rows), width), tokenizer.eos_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for n, row in enumerate(rows):
        ids[n, : len(row)], mask[n, : len(row)] = row, 1
    return ids, mask


def token_weights(chunk: np.ndarray, eos_id: int) -> np.ndarray:
    """w [B, T - 1] of targets c_1..c_{T-1}: 1[c != EOS] + 1[c is the chunk's first EOS]."""
    is_eos = chunk == eos_id
    first_eos = np.cumsum(is_eos, axis=-1) == 1
    return (first_eos & is_eos)[:, 1:].astype(np.float64) + (~is_eos)[:, 1:]


class GPT2Judge:
    """judge(tokens int [N, L]) -> (nll [N], counted tokens [N]) of MDLM's protocol (module
    docstring), for `text.sample_report` / `text.generative_perplexity`."""

    def __init__(self, model, variables, judge_tokenizer, source_tokenizer, *,
                 max_length: int = 1024, context: int = 1024, batch_size: int = 8):  # fmt: skip
        self.model, self.variables = model, variables
        self.judge_tokenizer, self.source_tokenizer = judge_tokenizer, source_tokenizer
        self.max_length, self.context, self.batch_size = max_length, context, batch_size
        self._nll = jax.jit(self._chunk_nll)

    def _chunk_nll(self, variables, chunk, mask):
        logits = self.model.apply(variables, chunk, mask)  # [B, T, V]
        log_p = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(log_p, chunk[:, 1:, None], axis=-1)[..., 0]  # [B, T - 1]

    def texts(self, tokens) -> list[str]:
        """The samples decoded by the diffusion model's tokenizer."""
        return [self.source_tokenizer.decode(row) for row in np.asarray(tokens)]

    def __call__(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = retokenize(self.texts(tokens), self.judge_tokenizer, self.max_length)
        n = ids.shape[0]
        nll, count = np.zeros(n), np.zeros(n)
        b = min(self.batch_size, n)
        for start in range(0, (n // b) * b, b):
            rows = slice(start, start + b)
            for lo in range(0, ids.shape[1], self.context):
                chunk, chunk_mask = (
                    ids[rows, lo : lo + self.context],
                    mask[rows, lo : lo + self.context],
                )
                if chunk.shape[1] < 2:
                    continue
                per_token = np.asarray(self._nll(self.variables, chunk, chunk_mask), np.float64)
                w = token_weights(chunk, self.judge_tokenizer.eos_id)
                nll[rows] += np.sum(w * per_token, axis=-1)
                count[rows] += np.sum(w, axis=-1)
        return nll, count


@functools.lru_cache(maxsize=2)
def _load(judge_dir: str):
    from didistill.data import text
    from didistill.nets.gpt2 import load_gpt2

    model, variables = load_gpt2(judge_dir)
    return model, variables, text.GPT2Tokenizer.from_dir(judge_dir)


def gpt2_judge(config) -> GPT2Judge:
    """The GPT-2 judge of a text config (`config.eval.judge =
    'didistill.eval.gen_ppl:gpt2_judge'`); raises FileNotFoundError saying what to download."""
    from didistill.data import text

    ecfg = config.eval
    judge_dir = ecfg.get("judge_dir", "")
    if not judge_dir:
        raise FileNotFoundError(
            "config.eval.judge_dir is empty: download GPT-2 Large on a machine with network "
            "access (`huggingface-cli download openai-community/gpt2-large model.safetensors "
            "config.json vocab.json merges.txt --local-dir DIR`) and set config.eval.judge_dir=DIR"
        )
    model, variables, judge_tok = _load(judge_dir)
    source = text.get_tokenizer(config.data.tokenizer, config.data.get("tokenizer_dir", ""))
    return GPT2Judge(
        model, variables, judge_tok, source, max_length=config.data.length,
        context=min(1024, model.max_positions), batch_size=ecfg.get("perplexity_batch_size", 8),
    )  # fmt: skip


__all__ = ["GPT2Judge", "encode_with_eos", "gpt2_judge", "retokenize", "token_weights"]
