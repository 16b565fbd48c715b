"""Tests for didistill.data.text: exact likelihoods and entropies against brute-force
enumeration, sampling, batches, tokenizers and the tfds error."""

import itertools
import json

import numpy as np
import pytest

from didistill.data import text


def all_sequences(vocab, length):
    return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)


def entropy(p):
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


@pytest.fixture(scope="module")
def markov():
    return text.MarkovLanguage.create(vocab_size=3, order=2, branching=2, seed=1)


@pytest.fixture(scope="module")
def hmm():
    return text.HMMLanguage.create(num_states=2, vocab_size=3, seed=2)


def brute_force_hmm_log_prob(lang, x):
    """log sum over all hidden paths (H^L) of p(s, x)."""
    total = 0.0
    for path in itertools.product(range(lang.num_states), repeat=len(x)):
        p = lang.initial[path[0]] * lang.emission[path[0], x[0]]
        for i in range(1, len(x)):
            p *= lang.transition[path[i - 1], path[i]] * lang.emission[path[i], x[i]]
        total += p
    return np.log(total)


class TestMarkov:
    def test_is_sparse_and_stationary(self, markov):
        assert np.all((markov.transition > 0).sum(axis=1) == 2)
        np.testing.assert_allclose(markov.transition.sum(axis=1), 1.0)
        # pi is invariant under the context chain: P(x_2..x_{k+1}) = P(x_1..x_k)
        seqs = all_sequences(3, 3)
        p3 = np.exp(np.asarray(markov.log_prob(seqs), np.float64)).reshape(3, 3, 3)
        np.testing.assert_allclose(p3.sum(axis=0).ravel(), markov.context_probs, atol=1e-6)

    @pytest.mark.parametrize("length", [2, 5])
    def test_probabilities_sum_to_one_and_entropy_is_exact(self, markov, length):
        p = np.exp(np.asarray(markov.log_prob(all_sequences(3, length)), np.float64))
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
        np.testing.assert_allclose(entropy(p) / length, markov.entropy_per_token(length), 1e-5)

    def test_entropy_rate_is_the_entropy_increment(self, markov):
        h = [entropy(np.exp(np.asarray(markov.log_prob(all_sequences(3, n)), np.float64)))
             for n in (5, 6)]  # fmt: skip
        np.testing.assert_allclose(h[1] - h[0], markov.entropy_rate, rtol=1e-4)

    def test_samples_follow_the_law(self, markov):
        x = markov.sample(np.random.default_rng(0), 20000, 4)
        assert x.dtype == np.int32 and x.shape == (20000, 4)
        codes = x @ (3 ** np.arange(3, -1, -1))
        emp = np.bincount(codes, minlength=81) / len(x)
        p = np.exp(np.asarray(markov.log_prob(all_sequences(3, 4)), np.float64))
        assert 0.5 * np.abs(emp - p).sum() < 0.03

    def test_forbidden_transitions(self, markov):
        ctx, nxt = np.argwhere(markov.transition == 0)[0]
        x = np.array([[ctx // 3, ctx % 3, nxt]])
        assert np.asarray(markov.log_prob(x))[0] == -np.inf
        assert np.isfinite(np.asarray(markov.log_prob(x, smoothing=1e-3))[0])
        p = np.exp(np.asarray(markov.log_prob(all_sequences(3, 4), smoothing=0.1), np.float64))
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)  # smoothing keeps a distribution


class TestHMM:
    def test_forward_algorithm_matches_path_sum(self, hmm):
        x = all_sequences(3, 4)
        got = np.asarray(hmm.log_prob(x), np.float64)
        want = [brute_force_hmm_log_prob(hmm, row) for row in x[::7]]
        np.testing.assert_allclose(got[::7], want, rtol=1e-5)
        np.testing.assert_allclose(np.exp(got).sum(), 1.0, rtol=1e-5)

    def test_entropy_estimates(self, hmm):
        p = np.exp(np.asarray(hmm.log_prob(all_sequences(3, 6)), np.float64))
        est, se = hmm.entropy_per_token_estimate(6, num_samples=4000)
        assert abs(est - entropy(p) / 6) < 5 * se
        p7 = np.exp(np.asarray(hmm.log_prob(all_sequences(3, 7)), np.float64))
        increment = entropy(p7) - entropy(p)  # H(X_7 | X_<7) >= rate, close to it
        rate, se = hmm.entropy_rate_estimate(num_samples=1000, length=64)
        assert rate <= increment + 5 * se and increment - rate < 0.05

    def test_samples_follow_the_law(self, hmm):
        x = hmm.sample(np.random.default_rng(1), 20000, 3)
        emp = np.bincount(x @ np.array([9, 3, 1]), minlength=27) / len(x)
        p = np.exp(np.asarray(hmm.log_prob(all_sequences(3, 3)), np.float64))
        assert 0.5 * np.abs(emp - p).sum() < 0.03


class TestRegistry:
    def test_named_languages(self):
        lang = text.get_language("markov_small")
        assert lang is text.get_language("markov_small")  # built once
        assert lang.vocab_size == 8 and 0 < lang.entropy_rate < np.log(3)
        with pytest.raises(ValueError, match="unknown synthetic language"):
            text.get_language("english")

    def test_batches_are_deterministic_per_step(self):
        lang = text.get_language("markov_tiny")
        full = list(itertools.islice(text.batches(lang, 0, 4, 8), 3))
        resumed = next(text.batches(lang, 0, 4, 8, start_step=2))
        np.testing.assert_array_equal(full[2]["tokens"], resumed["tokens"])
        other = next(text.batches(lang, 0, 4, 8, start_step=2, shard=1))
        assert not np.array_equal(other["tokens"], resumed["tokens"])
        assert full[0]["tokens"].shape == (4, 8) and full[0]["tokens"].dtype == np.int32


def tiny_gpt2_files(tmp_path):
    """A GPT-2 style vocab: the 256 byte symbols plus merges 'h e', 'l l', 'he ll', 'Ġ w'."""
    byte_chars = list(text._byte_to_unicode().values())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
    vocab = byte_chars + [a + b for a, b in merges] + ["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    return vocab


class TestTokenizers:
    def test_bytes_roundtrip(self):
        tok = text.ByteTokenizer()
        ids = tok.encode("héllo ✓")
        assert max(ids) < 256 and tok.decode(ids + [tok.eos_id, tok.pad_id]) == "héllo ✓"

    def test_gpt2_bpe(self, tmp_path):
        vocab = tiny_gpt2_files(tmp_path)
        tok = text.GPT2Tokenizer.from_dir(str(tmp_path))
        ids = tok.encode("hello world")
        assert [vocab[i] for i in ids] == ["hell", "o", "Ġw", "o", "r", "l", "d"]
        assert tok.decode(ids) == "hello world"
        assert tok.decode(tok.encode("naïve, it's 42!\n")) == "naïve, it's 42!\n"
        assert tok.eos_id == len(vocab) - 1 and tok.vocab_size == len(vocab)

    def test_gpt2_missing_files(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
            text.get_tokenizer("gpt2", str(tmp_path))


class TestRealText:
    def test_missing_tfds_data(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="tfds build lm1b"):
            text.load_tfds_text("lm1b", "train", str(tmp_path))

    def test_packing(self):
        docs = [{"text": b"ab"}, {"text": b"cde"}, {"text": b""}]
        tok = text.ByteTokenizer()
        batch = next(text.text_batches(docs, tok, seed=0, batch_size=5, length=7))["tokens"]
        assert batch.shape == (5, 7) and batch.dtype == np.int32
        stream = [*b"ab", 256, *b"cde", 256, 256] * 3  # the documents in a cycle
        for row in batch:  # every row is a window of the cycle starting at a document
            starts = [0, 3, 7]
            assert any(list(row) == stream[s : s + 7] for s in starts)
        again = next(text.text_batches(docs, tok, seed=0, batch_size=5, length=7))["tokens"]
        np.testing.assert_array_equal(batch, again)
