"""Network files: one format for every network a run hands to the next.

A teacher for distillation, a classifier for KD or FID features, a converted EDM U-Net: each is
one msgpack file written by `save_model` and read by `load_model`,

    {'format': 'didistill.model/1', 'meta': JSON, 'params': the variables' state dict},

with `meta['net']` the network's config and `meta['net']['arch']` the architecture that
`build` rebuilds it with (`ARCHS`: 'mlp_denoiser', 'unet', 'adm', 'dit', 'classifier'). Writes
are atomic (`didistill.train.params_io`). Files written before this format (tags
'didistill.teacher/1', 'didistill.mdlm_teacher/1', 'didistill.classifier/1', which had the same
layout) are read too; their architecture is inferred from the tag and the config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from didistill.train.params_io import load_params, save_params

FORMAT = "didistill.model/1"
_LEGACY_ARCH = {"didistill.mdlm_teacher/1": "dit", "didistill.classifier/1": "classifier"}
ARCHS = ("mlp_denoiser", "unet", "adm", "dit", "classifier")


def json_config(net_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A network config as JSON-serialisable values (tuples become lists of ints)."""
    out = {}
    for key, value in dict(net_cfg).items():
        out[key] = [int(v) for v in value] if isinstance(value, (tuple, list)) else value
    return out


def build(net_cfg: Mapping[str, Any]):
    """The Flax module of a network config that names its `arch`."""
    arch = net_cfg.get("arch")
    if arch == "mlp_denoiser":
        from didistill.nets.mlp import denoiser_from_config

        return denoiser_from_config(net_cfg)
    if arch in ("unet", "adm"):
        from didistill.nets.convert_edm import unet_from_config

        return unet_from_config(net_cfg)[0]
    if arch == "dit":
        from didistill.nets.dit import dit_from_config

        return dit_from_config(net_cfg)
    if arch == "classifier":
        from didistill.nets.classifier import make_classifier

        return make_classifier(net_cfg)
    raise ValueError(f"unknown network arch {arch!r}; known: {', '.join(ARCHS)}")


def save_model(path: str, params, net_cfg: Mapping[str, Any], arch: str, **meta) -> str:
    """Writes `params` with meta {'net': net_cfg + {'arch': arch}, **meta}; returns `path`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown network arch {arch!r}; known: {', '.join(ARCHS)}")
    meta = dict(meta, net=dict(json_config(net_cfg), arch=arch))
    json.dumps(meta)  # fail before writing anything if meta is not JSON-serialisable
    return save_params(path, params, meta, FORMAT)


def load_model(
    path: str,
    arch: str | Sequence[str] | None = None,
    what: str = "network",
    how_to_create: str = "",
) -> tuple[Any, Any, dict[str, Any]]:
    """(module, params, meta) of a file written by `save_model`: module.apply(params, ...).

    `arch` (one or several) is what the caller can use; a file of another architecture is a
    ValueError naming both. A missing file is a FileNotFoundError, an unreadable one a
    ValueError; each message names `what` the file should hold and ends with `how_to_create`.
    """
    tags = (FORMAT, "didistill.teacher/1", *_LEGACY_ARCH)
    params, meta, tag = load_params(path, tags, what, how_to_create)
    net = meta.get("net")
    if not isinstance(net, dict):
        raise ValueError(f"{path} is not a readable {what} file (no 'net' meta). {how_to_create}")
    if "arch" not in net:  # files from before the arch was recorded
        arch_of_tag = _LEGACY_ARCH.get(tag) or ("unet" if "img_resolution" in net else None)
        net = meta["net"] = dict(net, arch=arch_of_tag or "mlp_denoiser")
    wanted = (arch,) if isinstance(arch, str) else tuple(arch or ())
    if wanted and net["arch"] not in wanted:
        raise ValueError(
            f"{path} holds a {net['arch']!r} network, not a {' or '.join(wanted)} ({what}). "
            + how_to_create
        )
    try:
        module = build(net)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a readable {what} file (bad 'net' meta: {err})") from err
    return module, params, meta


__all__ = ["ARCHS", "FORMAT", "build", "json_config", "load_model", "save_model"]
