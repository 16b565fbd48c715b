"""Pre-tokenised text: shards of token ids written once, read by the training input pipeline.

    python -m didistill.data.token_shards --tfds_name=huggingface:openwebtext \\
        --tfds_data_dir=TFDS --split='train[:-100000]' --tokenizer=gpt2 \\
        --tokenizer_dir=GPT2 --out=TOKENS/train [--shard_tokens=100000000]

tokenises every document of a prepared tfds text dataset (`data.text.load_tfds_text`) once and
writes the document stream, each document followed by EOS (MDLM's wrapped OpenWebText,
kuleshov-group/mdlm @ c112c52 `dataloader.py` `_group_texts`), as `.npy` shards of at most
`shard_tokens` ids (uint16 when V <= 65,536, else uint32) plus `tokens.json` (tokenizer, V,
EOS id, token and document counts, shard names, the source). Training reads it with
`config.data.kind='tokens'`, `config.data.tokens_dir=TOKENS/train` (and
`heldout_tokens_dir=TOKENS/validation`): the shards are memory-mapped and a batch is a gather
of contiguous slices, so no tokenizer runs in the training process (the tokenizer files are
needed only to write the shards, and by a judge that decodes samples).

Blocks (MDLM's packing): the stream is cut into consecutive blocks of B = L - 2 ids (framing
'mdlm': BOS + block + EOS, BOS = EOS for GPT-2) or B = L ids (framing 'none'); block b covers
stream[b B : (b + 1) B], across shard boundaries. MDLM shuffles the blocks once per epoch;
here each row of step s draws a block index uniformly from default_rng([seed, shard, s])
(sampling with replacement), so a resumed run sees the same batches without saving a sampler
state. The last partial block is dropped, as MDLM's `_group_texts` drops the remainder.

Without the tokenizer files, or with a missing or incomplete token folder, the command and the
training stop with one message saying how to get them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator

import numpy as np

META = "tokens.json"
FRAMINGS = ("none", "mdlm")


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shards(
    documents: Iterable, tokenizer, out_dir: str, *, text_key: str = "text",
    shard_tokens: int = 100_000_000, source: str = "",
) -> dict:  # fmt: skip
    """Tokenises `documents` (strings, bytes or records with `text_key`) once into `out_dir`:
    shards `tokens_00000.npy`, ... of at most `shard_tokens` ids and `tokens.json` (written
    last, so a folder without it is an interrupted write). Returns the metadata."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    dtype, eos = _dtype(tokenizer.vocab_size), int(tokenizer.eos_id)
    shards, pending, pending_len, num_tokens, num_docs = [], [], 0, 0, 0

    def flush(ids):
        name = f"tokens_{len(shards):05d}.npy"
        np.save(os.path.join(out_dir, name), np.asarray(ids, dtype))
        shards.append(name)

    for record in documents:
        doc = record[text_key] if isinstance(record, dict) else record
        ids = [*tokenizer.encode(doc), eos]
        num_docs += 1
        num_tokens += len(ids)
        pending.append(np.asarray(ids, dtype))
        pending_len += len(ids)
        while pending_len >= shard_tokens:
            stream = np.concatenate(pending)
            flush(stream[:shard_tokens])
            pending, pending_len = [stream[shard_tokens:]], len(stream) - shard_tokens
    if pending_len:
        flush(np.concatenate(pending))
    meta = {
        "tokenizer": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size),
        "eos_id": eos, "num_tokens": num_tokens, "num_documents": num_docs,
        "dtype": np.dtype(dtype).name, "shards": shards, "source": source,
    }  # fmt: skip
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _howto(tokens_dir: str) -> str:
    return (
        f"write it once with `python -m didistill.data.token_shards --tfds_name=NAME "
        f"--tfds_data_dir=TFDS --split=SPLIT --tokenizer=gpt2 --tokenizer_dir=GPT2 "
        f"--out={tokens_dir or 'DIR'}` (docs/text_scale.md) and set config.data.tokens_dir"
    )


class TokenStream:
    """The memory-mapped document stream of a token folder: `len()` ids, `slice(a, b)`."""

    def __init__(self, tokens_dir: str):
        path = os.path.join(tokens_dir or "", META)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no token shards at {tokens_dir!r} ({META} missing): " + _howto(tokens_dir)
            )
        with open(path) as f:
            self.meta = json.load(f)
        self.shards = []
        for name in self.meta["shards"]:
            shard = os.path.join(tokens_dir, name)
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"token shard {shard} is missing: " + _howto(tokens_dir))
            self.shards.append(np.load(shard, mmap_mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        if self.starts[-1] != self.meta["num_tokens"]:
            raise ValueError(
                f"{tokens_dir}: the shards hold {self.starts[-1]} ids, {META} says "
                f"{self.meta['num_tokens']}: " + _howto(tokens_dir)
            )
        self.vocab_size, self.eos_id = int(self.meta["vocab_size"]), int(self.meta["eos_id"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int32 (across shard boundaries)."""
        parts, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            end = min(stop, int(self.starts[i + 1]))
            parts.append(self.shards[i][pos - self.starts[i] : end - self.starts[i]])
            pos = end
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def token_batches(
    stream: TokenStream, seed: int, batch_size: int, length: int, start_step: int = 0,
    shard: int = 0, framing: str = "none",
) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """Endless {'tokens': int32 [batch_size, length]} of random blocks of the stream (module
    docstring): rows of step s from default_rng([seed, shard, s])."""
    if framing not in FRAMINGS:
        raise ValueError(f"config.data.framing={framing!r} must be one of {FRAMINGS}")
    body = length - 2 if framing == "mdlm" else length
    num_blocks = len(stream) // body
    if num_blocks < 1:
        raise ValueError(
            f"the token stream has {len(stream)} ids, fewer than one block of {body}: write "
            "more documents or lower config.data.length"
        )
    eos = np.full((batch_size, 1), stream.eos_id, np.int32)
    step = start_step
    while True:
        blocks = np.random.default_rng([seed, shard, step]).integers(num_blocks, size=batch_size)
        rows = np.stack([stream.slice(b * body, (b + 1) * body) for b in blocks])
        if framing == "mdlm":
            rows = np.concatenate([eos, rows, eos], axis=1)
        yield {"tokens": rows}
        step += 1


def main(argv=None) -> dict:
    """The command of the module docstring; errors are one line and status 1."""
    from didistill.data import text

    parser = argparse.ArgumentParser(
        prog="python -m didistill.data.token_shards", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tfds_name", required=True, help="tfds name or prepared folder")
    parser.add_argument("--tfds_data_dir", default="", help="tfds data dir ($TFDS_DATA_DIR)")
    parser.add_argument("--split", default="train", help="tfds split, e.g. 'train[:-100000]'")
    parser.add_argument("--text_key", default="text")
    parser.add_argument("--tokenizer", default="gpt2", help="'gpt2' or 'bytes'")
    parser.add_argument("--tokenizer_dir", default="", help="GPT-2 vocab.json + merges.txt")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    try:
        tokenizer = text.get_tokenizer(args.tokenizer, args.tokenizer_dir)
        source = text.load_tfds_text(args.tfds_name, args.split, args.tfds_data_dir or None)
        meta = write_shards(
            (source[i] for i in range(len(source))), tokenizer, args.out,
            text_key=args.text_key, shard_tokens=args.shard_tokens,
            source=f"{args.tfds_name}:{args.split}",
        )  # fmt: skip
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"didistill.data.token_shards: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{meta['num_tokens']} tokens of {meta['num_documents']} documents in "
          f"{len(meta['shards'])} shards at {args.out}")  # fmt: skip
    return meta


__all__ = ["FRAMINGS", "META", "TokenStream", "main", "token_batches", "write_shards"]

if __name__ == "__main__":
    main()
