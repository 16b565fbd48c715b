"""Synthetic languages with exact likelihood, and a registry of named ones.

Two sources, both frozen dataclasses holding float64 NumPy tables, built from a fixed seed:

Sparse Markov source of order k (`MarkovLanguage`). A context c = (x_{i-k}, ..., x_{i-1}) in
V^k allows only `branching` next tokens, with Dirichlet(concentration) probabilities P(v | c).
The contexts form a Markov chain (c -> shift(c, v)); the construction redraws until that chain
has a single closed class, aperiodic, so it has a unique stationary law pi over contexts (solved
exactly; contexts outside the class are transient, pi = 0, and never occur). A sequence
starts with its first k tokens drawn from pi and continues with P:

    log p(x_{1:L}) = log pi(x_{1:k}) + sum_{i > k} log P(x_i | x_{i-k:i-1})          (exact)
    entropy rate   h = -sum_c pi(c) sum_v P(v | c) log P(v | c)                      (exact)
    H(X_{1:L}) / L = (H(pi) + (L - k) h) / L      (exact per-token entropy of length L)

Hidden Markov source (`HMMLanguage`). H hidden states with transition A [H, H], emission
B [H, V] (Dirichlet rows mixed with 1e-3 uniform, so every entry is positive) and initial law
the stationary distribution of A. log p(x) is exact by the forward algorithm (log space). The
entropy of an HMM has no closed form; we ESTIMATE by Monte Carlo (fixed seed, forward algorithm
on sampled sequences; the standard error is returned too):

    entropy_per_token(L)  = E[-log p(X_{1:L})] / L                   (unbiased estimate)
    entropy_rate()        = mean over n in [L/2, L) of E[-log p(X_n | X_{<n})], L = 256:
                            an upper bound on the rate that converges to it exponentially fast
                            in n for a positive HMM (Cover & Thomas, Thm 4.5.1).

`log_prob` is pure JAX (jittable, float32 unless x64 is on); `sample` uses NumPy. Smoothing
(`log_prob(x, smoothing=e)`) mixes every conditional with e/V uniform so that a judge gives a
finite NLL to sequences the sparse source forbids. Named sources: `get_language(name)`.

Real text (section at the end): `ByteTokenizer` (256 bytes + EOS + PAD, nothing to download),
`GPT2Tokenizer.from_dir(dir)` (byte-level BPE read from GPT-2's vocab.json and merges.txt),
`load_tfds_text` (a prepared tfds dataset, read without TensorFlow through `tfds` random-access
data sources) and `text_batches` (documents joined with EOS and cut to fixed length, as MDLM's
`wrap=True`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse import csr_matrix, identity
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import spsolve


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    """-sum p log p over axis (0 log 0 = 0), float64."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _stationary(matrix) -> np.ndarray:
    """Stationary law pi = pi P of a row-stochastic (sparse or dense) P [n, n], float64 [n].

    P must have exactly one closed communicating class, and it must be aperiodic (checked);
    transient states get pi = 0. Solved exactly on the closed class (sparse LU).
    """
    graph = csr_matrix(matrix)
    graph.eliminate_zeros()
    size = graph.shape[0]
    _, labels = connected_components(graph, directed=True, connection="strong")
    src, dst = graph.nonzero()
    leaving = np.unique(labels[src[labels[src] != labels[dst]]])
    closed = np.setdiff1d(np.unique(labels), leaving)
    if len(closed) != 1:
        raise ValueError(f"the chain has {len(closed)} closed classes; need exactly one")
    members = np.flatnonzero(labels == closed[0])
    sub = graph[members][:, members]
    if not _is_aperiodic(sub):
        raise ValueError("the closed class of the chain is periodic")
    system = (sub.T - identity(len(members), format="csr")).tolil()
    system[0, :] = 1.0  # replace one balance equation by sum(pi) = 1
    rhs = np.zeros(len(members))
    rhs[0] = 1.0
    pi = np.zeros(size)
    pi[members] = np.maximum(spsolve(system.tocsc(), rhs), 0.0)
    return pi / pi.sum()


def _is_aperiodic(graph: csr_matrix) -> bool:
    """Period 1 of a strongly connected graph: gcd over edges u -> v of d(u) + 1 - d(v), with d
    the BFS depth from node 0."""
    level = np.full(graph.shape[0], -1)
    level[0], frontier = 0, [0]
    while frontier:
        nxt = []
        for u in frontier:
            for v in graph.indices[graph.indptr[u] : graph.indptr[u + 1]]:
                if level[v] < 0:
                    level[v] = level[u] + 1
                    nxt.append(v)
        frontier = nxt
    src, dst = graph.nonzero()
    return math.gcd(*np.abs(level[src] + 1 - level[dst]).tolist()) == 1


def _draw_rows(rng, cdf: np.ndarray) -> np.ndarray:
    """One index per row of a [n, K] cumulative table (inverse-CDF sampling)."""
    u = rng.random(cdf.shape[0])[:, None]
    return np.minimum((u > cdf).sum(axis=-1), cdf.shape[-1] - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovLanguage:
    """Sparse order-k Markov source over V tokens (see the module docstring).

    transition [C, V] (C = V^k contexts, a context indexes its tokens in base V, oldest first)
    and context_probs [C] (stationary law of the first k tokens), float64.
    """

    vocab_size: int
    order: int
    transition: np.ndarray
    context_probs: np.ndarray

    @classmethod
    def create(cls, vocab_size, order, branching, seed=0, concentration=1.0) -> MarkovLanguage:
        if not 1 <= branching <= vocab_size or order < 1 or vocab_size < 2:
            raise ValueError(
                f"need vocab_size >= 2, order >= 1, 1 <= branching <= vocab_size; got "
                f"{vocab_size}, {order}, {branching}"
            )
        num_ctx = vocab_size**order
        for attempt in range(100):  # redraw until one closed, aperiodic class of contexts
            rng = np.random.default_rng([seed, attempt])
            allowed = np.argsort(rng.random((num_ctx, vocab_size)), axis=1)[:, :branching]
            probs = rng.dirichlet(np.full(branching, concentration), size=num_ctx)  # [C, b]
            transition = np.zeros((num_ctx, vocab_size))
            np.put_along_axis(transition, allowed, probs, axis=1)
            src = np.repeat(np.arange(num_ctx), branching)
            dst = (src * vocab_size + allowed.ravel()) % num_ctx  # shift(c, v)
            chain = csr_matrix((probs.ravel(), (src, dst)), shape=(num_ctx, num_ctx))
            try:
                return cls(vocab_size, order, transition, _stationary(chain))
            except ValueError:
                continue
        raise ValueError("no sparse Markov source with a unique stationary law; raise branching")

    @property
    def entropy_rate(self) -> float:
        """h = E_pi[H(P(. | c))] in nats per token (exact)."""
        return float(self.context_probs @ _entropy(self.transition))

    def entropy_per_token(self, length: int) -> float:
        """H(X_{1:L}) / L = (H(pi) + (L - k) h) / L, exact, for L >= k."""
        if length < self.order:
            raise ValueError(f"length {length} < order {self.order}")
        h_ctx = float(_entropy(self.context_probs))
        return (h_ctx + (length - self.order) * self.entropy_rate) / length

    def sample(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """n sequences int32 [n, length] from the stationary source."""
        v, k = self.vocab_size, self.order
        ctx = _draw_rows(rng, np.broadcast_to(np.cumsum(self.context_probs), (n, v**k)))
        digits = [(ctx // v ** (k - 1 - j)) % v for j in range(k)]
        cdf = np.cumsum(self.transition, axis=1)  # [C, V]
        for _ in range(length - k):
            ctx = np.sum([d * v ** (k - 1 - j) for j, d in enumerate(digits[-k:])], axis=0)
            digits.append(_draw_rows(rng, cdf[ctx]))
        return np.stack(digits[:length], axis=1).astype(np.int32)

    def log_prob(self, tokens, smoothing: float = 0.0) -> jax.Array:
        """log p(x) [n] of tokens [n, L] (L >= k); -inf where the source forbids a transition
        (unless smoothing > 0: every factor becomes (1 - e) p + e / |support|)."""
        x = jnp.asarray(tokens, jnp.int32)
        v, k = self.vocab_size, self.order
        weights = v ** jnp.arange(k - 1, -1, -1)  # [k], oldest token most significant
        windows = jnp.stack([x[:, j : x.shape[1] - k + j] for j in range(k)], axis=-1)
        ctx = windows @ weights  # [n, L - k] context of tokens k..L-1
        first = x[:, :k] @ weights  # [n]
        log_t = _smoothed_log(self.transition, smoothing)  # [C, V]
        log_c = _smoothed_log(self.context_probs, smoothing)  # [C]
        return log_c[first] + jnp.sum(log_t[ctx, x[:, k:]], axis=-1)


def _smoothed_log(p: np.ndarray, smoothing: float) -> jax.Array:
    """log((1 - e) p + e / K) along the last axis (K its size), as a jnp float32 table."""
    p = (1.0 - smoothing) * p + smoothing / p.shape[-1]
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.log(p), jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class HMMLanguage:
    """Hidden Markov source: initial [H], transition [H, H], emission [H, V], float64."""

    vocab_size: int
    num_states: int
    initial: np.ndarray
    transition: np.ndarray
    emission: np.ndarray

    @classmethod
    def create(
        cls, num_states, vocab_size, seed=0, transition_concentration=0.2,
        emission_concentration=0.2, floor=1e-3,
    ) -> HMMLanguage:  # fmt: skip
        rng = np.random.default_rng(seed)
        mix = lambda p: (1.0 - floor) * p + floor / p.shape[-1]
        transition = mix(rng.dirichlet(np.full(num_states, transition_concentration), num_states))
        emission = mix(rng.dirichlet(np.full(vocab_size, emission_concentration), num_states))
        initial = _stationary(transition)
        return cls(vocab_size, num_states, initial, transition, emission)

    def sample(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """n sequences int32 [n, length]; the hidden chain starts stationary."""
        state = _draw_rows(rng, np.broadcast_to(np.cumsum(self.initial), (n, self.num_states)))
        a_cdf, b_cdf = np.cumsum(self.transition, axis=1), np.cumsum(self.emission, axis=1)
        out = np.empty((n, length), np.int32)
        for i in range(length):
            out[:, i] = _draw_rows(rng, b_cdf[state])
            state = _draw_rows(rng, a_cdf[state])
        return out

    def token_log_probs(self, tokens, smoothing: float = 0.0) -> jax.Array:
        """log p(x_i | x_{<i}) [n, L] by the forward algorithm (their sum is log p(x))."""
        x = jnp.asarray(tokens, jnp.int32)
        log_a = jnp.asarray(np.log(self.transition), jnp.float32)  # [H, H]
        log_b = _smoothed_log(self.emission, smoothing)  # [H, V]
        log_alpha0 = jnp.log(jnp.asarray(self.initial, jnp.float32))  # [H], p(s_1)

        def step(log_prior, x_i):  # log_prior [n, H] = log p(s_i, x_{<i}) - log p(x_{<i})
            joint = log_prior + log_b[:, x_i].T  # [n, H]
            log_norm = jax.nn.logsumexp(joint, axis=-1)  # log p(x_i | x_{<i})
            post = joint - log_norm[:, None]
            return jax.nn.logsumexp(post[:, :, None] + log_a[None], axis=1), log_norm

        prior = jnp.broadcast_to(log_alpha0, (x.shape[0], self.num_states))
        _, cond = jax.lax.scan(step, prior, x.T)
        return cond.T

    def log_prob(self, tokens, smoothing: float = 0.0) -> jax.Array:
        """log p(x) [n] of tokens [n, L] (exact, forward algorithm)."""
        return jnp.sum(self.token_log_probs(tokens, smoothing), axis=-1)

    @functools.cache  # noqa: B019 (instances are few, long-lived and hashed by identity)
    def _mc_conditional_nll(self, length: int, num_samples: int, seed: int) -> np.ndarray:
        x = self.sample(np.random.default_rng(seed), num_samples, length)
        return -np.asarray(jax.jit(self.token_log_probs)(x), np.float64)  # [n, L]

    def entropy_per_token_estimate(
        self, length: int, num_samples: int = 4096, seed: int = 0
    ) -> tuple[float, float]:
        """(estimate, standard error) of H(X_{1:L}) / L by Monte Carlo."""
        nll = self._mc_conditional_nll(length, num_samples, seed).sum(axis=1) / length
        return float(nll.mean()), float(nll.std(ddof=1) / math.sqrt(num_samples))

    def entropy_per_token(self, length: int) -> float:
        return self.entropy_per_token_estimate(length)[0]

    def entropy_rate_estimate(self, num_samples: int = 2048, seed: int = 0, length: int = 256):
        """(estimate, standard error) of the rate from E[-log p(X_n | X_{<n})], n >= L/2."""
        nll = self._mc_conditional_nll(length, num_samples, seed)[:, length // 2 :].mean(axis=1)
        return float(nll.mean()), float(nll.std(ddof=1) / math.sqrt(num_samples))

    @property
    def entropy_rate(self) -> float:
        return self.entropy_rate_estimate()[0]


Language = MarkovLanguage | HMMLanguage

LANGUAGES = {
    # name: (factory, one-line description)
    "markov_tiny": (lambda: MarkovLanguage.create(4, 1, 2, seed=0), "V=4, order 1, 2 next"),
    "markov_small": (lambda: MarkovLanguage.create(8, 2, 3, seed=0), "V=8, order 2, 3 next"),
    "markov": (lambda: MarkovLanguage.create(32, 2, 4, seed=0), "V=32, order 2, 4 next"),
    "hmm_small": (lambda: HMMLanguage.create(4, 8, seed=0), "H=4 states, V=8"),
    "hmm": (lambda: HMMLanguage.create(16, 32, seed=0), "H=16 states, V=32"),
}


@functools.cache
def get_language(name: str) -> Language:
    """A named synthetic language (built once per process); see `LANGUAGES`."""
    if name not in LANGUAGES:
        raise ValueError(f"unknown synthetic language {name!r}; choose one of {sorted(LANGUAGES)}")
    return LANGUAGES[name][0]()


def batches(
    language: Language,
    seed: int,
    batch_size: int,
    length: int,
    start_step: int = 0,
    shard: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches {'tokens': int32 [batch_size, length]}, one per step from start_step.

    Batch `step` depends only on (seed, shard, step) through default_rng([seed, shard, step]),
    so a resumed run sees the same data; `shard` separates processes (jax.process_index()).
    """
    step = start_step
    while True:
        rng = np.random.default_rng([seed, shard, step])
        yield {"tokens": language.sample(rng, batch_size, length)}
        step += 1


# --------------------------------------------------------------------------------------------
# Real text: tokenizers, tfds loading and fixed-length packing.

TFDS_HOWTO = (
    "Prepare it on a machine with network access and TensorFlow, in the array_record format "
    "(random access without TensorFlow): `pip install tensorflow tensorflow-datasets` then "
    "`tfds build {name} --data_dir=DIR --file_format=array_record` (OpenWebText is not in the "
    "tfds catalog: use `huggingface:openwebtext`, which also needs `pip install datasets`), "
    "copy DIR here and set config.data.tfds_data_dir=DIR (or TFDS_DATA_DIR), or set "
    "config.data.tfds_name to the prepared version folder itself (the one holding "
    "dataset_info.json)."
)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus EOS = 256 and PAD = 257 (vocab_size 258)."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, chars, strict=True)}


# GPT-2's pre-tokenizer with stdlib `re` classes: \p{L} ~ [^\W\d_], \p{N} ~ \d (identical on
# ASCII; rare non-decimal numerals such as '²' are split as punctuation instead).
_GPT2_SPLIT = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (Radford et al. 2019) from its vocab.json and merges.txt."""

    EOS = "<|endoftext|>"

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.byte_map = _byte_to_unicode()
        self.byte_unmap = {c: b for b, c in self.byte_map.items()}
        self.vocab_size = max(self.decoder) + 1
        self.eos_id = self.encoder.get(self.EOS, self.vocab_size - 1)
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_dir(cls, directory: str) -> GPT2Tokenizer:
        paths = [os.path.join(directory or "", f) for f in ("vocab.json", "merges.txt")]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"GPT-2 tokenizer files not found: {missing}. The GPT-2 BPE needs vocab.json and "
                "merges.txt (from the Hugging Face repository openai-community/gpt2, or any GPT-2 "
                "tokenizer copy); download them on a machine with network access, put both in one "
                "folder and set config.data.tokenizer_dir to it. Or use the byte tokenizer "
                "(config.data.tokenizer='bytes'), which needs no file."
            )
        with open(paths[0], encoding="utf-8") as f:
            encoder = json.load(f)
        with open(paths[1], encoding="utf-8") as f:
            lines = [ln.split() for ln in f.read().splitlines() if ln and not ln.startswith("#")]
        return cls(encoder, [(a, b) for a, b in lines])

    def _bpe(self, word: str) -> list[str]:
        if word not in self._cache:
            parts = list(word)
            while len(parts) > 1:
                pairs = [
                    (self.ranks.get(p, math.inf), i)
                    for i, p in enumerate(zip(parts, parts[1:], strict=False))
                ]
                rank, i = min(pairs)
                if rank == math.inf:
                    break
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            self._cache[word] = parts
        return self._cache[word]

    def encode(self, text: str | bytes) -> list[int]:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        ids = []
        for piece in _GPT2_SPLIT.findall(text):
            word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._bpe(word))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder.get(int(i), "") for i in ids)
        data = bytes(self.byte_unmap[c] for c in text if c in self.byte_unmap)
        return data.decode("utf-8", errors="replace")


def get_tokenizer(name: str, tokenizer_dir: str = "") -> ByteTokenizer | GPT2Tokenizer:
    """'bytes' (no files) or 'gpt2' (vocab.json + merges.txt in tokenizer_dir)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer.from_dir(tokenizer_dir)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'bytes' or 'gpt2'")


def _prepared_dir(name: str, data_dir: str | None) -> str | None:
    if os.path.isfile(os.path.join(name, "dataset_info.json")):
        return name
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    root = os.path.join(os.path.expanduser(data_dir), name.replace(":", "__"))
    found = glob.glob(os.path.join(root, "**", "dataset_info.json"), recursive=True)
    return os.path.dirname(sorted(found)[-1]) if found else None


def load_tfds_text(name: str, split: str, data_dir: str | None = None):
    """Random-access sequence of records of a prepared tfds text dataset (no TensorFlow).

    `name`: a tfds name ('lm1b', 'huggingface:openwebtext', looked up under data_dir) or the
    prepared version folder. Raises FileNotFoundError saying how to prepare it when missing.
    """
    folder = _prepared_dir(name, data_dir)
    if folder is None:
        raise FileNotFoundError(
            f"tfds text dataset {name!r} is not prepared under {data_dir or '$TFDS_DATA_DIR'}. "
            + TFDS_HOWTO.format(name=name)
        )
    import tensorflow_datasets as tfds  # heavy; only when real text is asked for

    builder = tfds.builder_from_directory(folder)
    if "array_record" not in str(builder.info.file_format):
        raise ValueError(
            f"{folder} holds {builder.info.file_format}, which needs TensorFlow to read. "
            + TFDS_HOWTO.format(name=name)
        )
    return builder.as_data_source(split=split)


def text_batches(
    source, tokenizer, seed: int, batch_size: int, length: int, start_step: int = 0,
    shard: int = 0, text_key: str = "text", framing: str = "none",
) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """Endless {'tokens': int32 [batch_size, length]} from a random-access text source.

    Each row starts at a random document (rng = default_rng([seed, shard, step])) and joins
    the following documents, each followed by EOS. framing='none': the first `length` tokens;
    'mdlm' (MDLM's wrapped OpenWebText, kuleshov-group/mdlm @ c112c52 dataloader.py
    `_group_texts` 277-300 and the wrap branch 422-429): BOS + the first length - 2 tokens + EOS
    (BOS = EOS = `tokenizer.eos_id` for GPT-2, whose BOS and EOS are one token). MDLM cuts one
    concatenation of the shuffled corpus into such blocks; here each block starts at a document
    boundary of a random document.
    """
    if framing not in ("none", "mdlm"):
        raise ValueError(f"config.data.framing={framing!r} must be 'none' or 'mdlm'")
    body = length - 2 if framing == "mdlm" else length
    step = start_step
    while True:
        rng = np.random.default_rng([seed, shard, step])
        rows = []
        for _ in range(batch_size):
            doc, ids = int(rng.integers(len(source))), []
            while len(ids) < body:
                record = source[doc % len(source)]
                ids += tokenizer.encode(record[text_key] if isinstance(record, dict) else record)
                ids.append(tokenizer.eos_id)
                doc += 1
            ids = ids[:body]
            if framing == "mdlm":
                ids = [tokenizer.eos_id, *ids, tokenizer.eos_id]
            rows.append(ids)
        yield {"tokens": np.asarray(rows, np.int32)}
        step += 1


__all__ = [
    "LANGUAGES",
    "TFDS_HOWTO",
    "ByteTokenizer",
    "GPT2Tokenizer",
    "HMMLanguage",
    "Language",
    "MarkovLanguage",
    "batches",
    "get_language",
    "get_tokenizer",
    "load_tfds_text",
    "text_batches",
]
