"""Convert EDM U-Net weights (DDPM++ SongUNet, ADM DhariwalUNet) between PyTorch state-dict
naming and our Flax tree.

EDM (Karras et al. 2022, NVlabs/edm) ships networks as pickles that need EDM's own code
(`dnnlib`, `torch_utils`) to load. This project cannot run that code, so the user exports the
weights to a plain `.npz` on their own machine, inside a checkout of NVlabs/edm:

    import pickle, numpy as np
    import dnnlib  # noqa: F401  (EDM's code must be importable to unpickle)
    with open("edm-cifar10-32x32-cond-vp.pkl", "rb") as f:
        net = pickle.load(f)["ema"]  # an EDMPrecond wrapping a SongUNet
    np.savez("edm-cifar10-cond.npz",
             **{k: v.cpu().numpy() for k, v in net.state_dict().items()})

and then, here,

    python -m didistill.nets.convert_edm edm-cifar10-cond.npz teacher.msgpack \\
        --config=edm-cifar10-cond

The same export of `edm-imagenet-64x64-cond-adm.pkl` (an EDMPrecond wrapping a DhariwalUNet)
converts with `--config=edm-imagenet64-cond`. `--config` is a preset name from `PRESETS`, an
inline JSON object, or a .json file with the fields of the network plus `img_resolution`,
`img_channels` and `arch`: 'unet' (the default; `UNetDenoiser`, EDM's DDPM++ of the '-vp'
pickles) or 'adm' (`didistill.nets.adm.ADMDenoiser`, EDM's ADM of ImageNet-64). NCSN++ ('-ve'
pickles) uses other layers and is not supported.

Name and layout mapping (state dict <-> Flax, see `didistill.nets.unet` and `.adm`):

    model.<path>.weight  [O, I, kh, kw]  <->  ('model', *path, 'kernel') [kh, kw, I, O]  (conv)
    model.<path>.weight  [O, I]          <->  ('model', *path, 'kernel') [I, O]          (linear)
    model.<path>.weight  [C]             <->  ('model', *path, 'scale')  [C]        (GroupNorm)
    model.<path>.bias    [C]             <->  ('model', *path, 'bias')   [C]

plus the buffers `model.*.conv0.resample_filter` / `model.*.skip.resample_filter`
([1, 1, 2, 2], all 1/4, the [1, 1] filter of both DDPM++ and ADM) of up/down blocks, which
carry no parameter and are checked, then dropped (ADM's up/down skips are only that filter: no
`skip.weight`). The written file is a network file (`didistill.nets.files.save_model`) with
meta['net'] = the network config including meta['net']['arch'] ('unet' or 'adm'), so
`load_unet` (or `files.load_model`) rebuilds the network.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from didistill.nets.adm import ADMDenoiser
from didistill.nets.files import load_model, save_model
from didistill.nets.unet import UNetDenoiser

RESAMPLE_FILTER = np.full((1, 1, 2, 2), 0.25, np.float32)  # EDM's [1, 1] filter, normalised

_EDM_CIFAR10 = dict(
    model_channels=128,
    channel_mult=[2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    augment_dim=9,
    img_resolution=32,
    img_channels=3,
)
_EDM_IMAGENET64 = dict(  # EDM's train.py --arch=adm preset and its ImageNet-64 run
    arch="adm",
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    channel_mult_emb=4,
    num_blocks=3,
    attn_resolutions=[32, 16, 8],
    dropout=0.10,
    label_dropout=0.0,
    augment_dim=0,
    img_resolution=64,
    img_channels=3,
)
PRESETS: dict[str, dict[str, Any]] = {
    "edm-cifar10-cond": dict(_EDM_CIFAR10, label_dim=10),
    "edm-cifar10-uncond": dict(_EDM_CIFAR10, label_dim=0),
    "edm-imagenet64-cond": dict(_EDM_IMAGENET64, label_dim=1000),
}
ARCHS = {"unet": UNetDenoiser, "adm": ADMDenoiser}  # config['arch'] -> denoiser class
Denoiser = UNetDenoiser | ADMDenoiser


class StateDictError(ValueError):
    """An EDM state dict does not match the U-Net it is converted into."""


def _arch(config: Mapping[str, Any]) -> str:
    arch = config.get("arch", "unet")
    if arch not in ARCHS:
        raise ValueError(f"unknown U-Net arch {arch!r}; known: {sorted(ARCHS)}")
    return arch


def unet_from_config(config: Mapping[str, Any]) -> tuple[Denoiser, tuple[int, int, int]]:
    """(denoiser, image shape (H, W, C)) from a config with the net's fields, `img_resolution`,
    `img_channels` and `arch` ('unet', the default: `UNetDenoiser`; 'adm': `ADMDenoiser`).
    Unknown keys are an error."""
    cls = ARCHS[_arch(config)]
    fields = (*(f for f in cls.raw_fields if f != "dtype"), "sigma_data")  # JSON-able fields
    unknown = set(config) - set(fields) - {"img_resolution", "img_channels", "arch"}
    if unknown:
        raise ValueError(f"unknown U-Net config keys {sorted(unknown)}; known: {fields}")
    kwargs = {k: config[k] for k in fields if k in config}
    for key in ("channel_mult", "attn_resolutions"):
        if key in kwargs:
            kwargs[key] = tuple(int(v) for v in kwargs[key])
    res = int(config.get("img_resolution", 32))
    return cls(**kwargs), (res, res, int(config.get("img_channels", 3)))


def param_template(net: Denoiser, image_shape) -> dict:
    """Shapes/dtypes of `net`'s variables ({'params': ...}) without computing anything."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if net.label_dim else None
    return jax.eval_shape(net.init, jax.random.key(0), x, jnp.ones((1,)), labels)


def _edm_name(path: tuple[str, ...]) -> str:
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join((*path[:-1], leaf))


def _to_edm_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv kernel [kh, kw, I, O] -> [O, I, kh, kw]
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:  # dense kernel [I, O] -> [O, I]
        return value.T
    return value


def _edm_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


def _from_edm_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # [O, I, kh, kw] -> [kh, kw, I, O]
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def _resample_buffers(flat_names) -> set[str]:
    """Names of EDM's resample_filter buffers for the up/down blocks among these params."""
    suffixes = ("_down.conv0.weight", "_up.conv0.weight")
    blocks = {n.rsplit(".", 2)[0] for n in flat_names if n.endswith(suffixes)}
    return {f"{b}.{layer}.resample_filter" for b in blocks for layer in ("conv0", "skip")}


def state_dict_shapes(template) -> dict[str, tuple[int, ...]]:
    """EDM name -> EDM-layout shape of every array a state dict for `template` holds
    (parameters and resample buffers), computed from shapes only (`param_template`)."""
    flat = traverse_util.flatten_dict(template.get("params", template))
    shapes = {_edm_name(path): _edm_shape(leaf.shape) for path, leaf in flat.items()}
    shapes.update({name: RESAMPLE_FILTER.shape for name in _resample_buffers(shapes)})
    return dict(sorted(shapes.items()))


def export_state_dict(variables) -> dict[str, np.ndarray]:
    """Flax variables ({'params': {'model': ...}} or the 'params' tree) -> EDM state dict."""
    params = variables.get("params", variables)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    out = {_edm_name(path): np.asarray(_to_edm_layout(np.asarray(v))) for path, v in flat.items()}
    out.update({name: RESAMPLE_FILTER.copy() for name in _resample_buffers(out)})
    return dict(sorted(out.items()))


def convert_state_dict(state_dict: Mapping[str, Any], template) -> dict:
    """EDM state dict (name -> array, EDM layout) -> Flax variables shaped like `template`.

    Args:
      state_dict: e.g. `np.load('x.npz')`, names like 'model.enc.32x32_conv.weight'.
      template: the target's variables or their shapes (`param_template(net, image_shape)`).

    Raises:
      StateDictError: naming every missing, mis-shaped or unexpected array.
    """
    wrapped = "params" in template
    flat = traverse_util.flatten_dict(template["params"] if wrapped else template)
    expected = {_edm_name(path): path for path in flat}
    buffers = _resample_buffers(expected)
    problems, out = [], {}
    for name, path in expected.items():
        want = _edm_shape(flat[path].shape)
        if name not in state_dict:
            problems.append(f"missing array {name!r} (expected shape {want})")
            continue
        value = np.asarray(state_dict[name])
        if value.shape != want:
            problems.append(f"array {name!r} has shape {value.shape}, expected {want}")
            continue
        out[path] = jnp.asarray(_from_edm_layout(value), dtype=flat[path].dtype)
    for name in buffers & set(state_dict):
        if not np.allclose(np.asarray(state_dict[name]), RESAMPLE_FILTER):
            problems.append(f"array {name!r} is not the DDPM++/ADM [1, 1] resample filter")
    extra = sorted(set(state_dict) - set(expected) - buffers)
    problems += [f"unexpected array {name!r}, shape {np.shape(state_dict[name])}" for name in extra]
    if problems:
        raise StateDictError(
            f"the EDM state dict does not match this U-Net ({len(problems)} problem(s); does "
            "the config match the network that produced it?):\n  " + "\n  ".join(problems)
        )
    params = traverse_util.unflatten_dict(out)
    return {"params": params} if wrapped else params


def convert_npz(npz_path: str, config: Mapping[str, Any]) -> tuple[Denoiser, dict]:
    """(net, variables) from an EDM state-dict .npz and a U-Net config (see `PRESETS`)."""
    net, image_shape = unet_from_config(config)
    with np.load(npz_path) as data:
        state_dict = {k: data[k] for k in data.files}
    return net, convert_state_dict(state_dict, param_template(net, image_shape))


def load_unet(path: str) -> tuple[Denoiser, dict, dict]:
    """(net, variables, meta) of a U-Net network file (`didistill.nets.files`, arch 'unet' or
    'adm')."""
    return load_model(path, tuple(ARCHS), "EDM U-Net", "Convert one with this module.")


def _read_config(text: str) -> dict[str, Any]:
    if text in PRESETS:
        return dict(PRESETS[text])
    if os.path.isfile(text):
        with open(text) as f:
            return json.load(f)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(
            f"--config {text!r} is neither a preset {sorted(PRESETS)}, a .json file, nor JSON"
        ) from err


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m didistill.nets.convert_edm",
        description="Convert an EDM DDPM++/ADM state dict (.npz) into a didistill U-Net file.",
        epilog="Make the .npz with EDM's code: see this module's docstring.",
    )
    parser.add_argument("npz", help="state dict saved with np.savez (EDM names and layouts)")
    parser.add_argument("out", help="output .msgpack (a didistill network file)")
    parser.add_argument("--config", required=True, help=f"preset {sorted(PRESETS)}, JSON, or file")
    args = parser.parse_args(argv)
    config = _read_config(args.config)
    try:
        _, variables = convert_npz(args.npz, config)
    except StateDictError as err:
        raise SystemExit(f"{args.npz}: {err}") from err
    save_model(args.out, variables, config, _arch(config), source=os.path.basename(args.npz))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
    print(f"wrote {args.out}: {count:,} parameters")


if __name__ == "__main__":
    main()
