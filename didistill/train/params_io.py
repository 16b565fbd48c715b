"""Params files: one msgpack file with a format tag, JSON meta and a params pytree.

Used for the artifacts a run hands to the next one (a teacher for distillation, a classifier
for KD or FID features). Writes are atomic (a temporary file renamed over the target), so an
interrupted write never leaves a broken file; reads fail with one message saying what the file
should be and how to re-create it. Training state lives in orbax checkpoints, not here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp


def save_params(path: str, params, meta: Mapping[str, Any], format_tag: str) -> str:
    """Writes `params` and JSON-serialisable `meta` under `format_tag`; returns `path`."""
    payload = {
        "format": format_tag,
        "meta": json.dumps(dict(meta), sort_keys=True),
        "params": flax.serialization.to_state_dict(jax.device_get(params)),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)
    return path


def load_params(
    path: str, format_tag: str | tuple[str, ...], what: str, how_to_create: str
) -> tuple[Any, dict[str, Any], str]:
    """(params as jnp arrays, meta, tag) of a file written by `save_params` with `format_tag`
    (or one of several tags).

    Raises FileNotFoundError when `path` is missing and ValueError when it is unreadable or of
    another format; both messages name `what` the file holds and end with `how_to_create`.
    """
    tags = (format_tag,) if isinstance(format_tag, str) else tuple(format_tag)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} params at {path}. {how_to_create}")
    try:
        with open(path, "rb") as f:
            payload = flax.serialization.msgpack_restore(f.read())
        if not isinstance(payload, dict) or payload.get("format") not in tags:
            raise ValueError(f"missing the {tags[0]!r} format tag")
        meta = json.loads(payload["meta"])
        params = jax.tree.map(jnp.asarray, payload["params"])
    except Exception as err:  # msgpack, json and key errors all mean the same to the user
        raise ValueError(
            f"{path} is not a readable {what} file ({type(err).__name__}: {err}). {how_to_create}"
        ) from err
    return params, meta, payload["format"]


__all__ = ["load_params", "save_params"]
