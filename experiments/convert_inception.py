"""Convert the PyTorch FID Inception weights into the Flax `.npz` that FID evaluation reads.

Run once, on a machine that has pytorch-fid's weights `pt_inception-2015-12-05-6726825d.pth`
(the TensorFlow `inception-2015-12-05` graph ported to PyTorch, released with mseitzer's
pytorch-fid):

    python experiments/convert_inception.py pt_inception-2015-12-05-6726825d.pth \\
        inception_fid.npz

Reading a `.pth` needs torch (`torch.load(..., weights_only=True)`, no pickled code). Without
torch, first export the state dict to a plain `.npz` where torch is installed,

    python -c "import torch, numpy as np; sd = torch.load('pt_inception-2015-12-05-6726825d.pth',
        map_location='cpu', weights_only=True);
        np.savez('pt_inception.npz', **{k: v.numpy() for k, v in sd.items()})"

and pass that `.npz` instead. The output is read by
`didistill.nets.inception.load_inception_params`.

Mapping (torch name -> Flax path in {'params', 'batch_stats'}; <m> is e.g. 'Mixed_6b.branch7x7_2'):

    <m>.conv.weight      [O, I, kh, kw] -> params/<m>/conv/kernel      [kh, kw, I, O]
    <m>.bn.weight        [O]            -> params/<m>/bn/scale         [O]
    <m>.bn.bias          [O]            -> params/<m>/bn/bias          [O]
    <m>.bn.running_mean  [O]            -> batch_stats/<m>/bn/mean     [O]
    <m>.bn.running_var   [O]            -> batch_stats/<m>/bn/var      [O]

Dropped: `*.num_batches_tracked` and the 1008-way classifier `fc.*` (FID uses pool3). A state
dict with `AuxLogits.*` or a 1000-way `fc` is torchvision's ImageNet Inception, whose weights
give different (non-FID) features: it is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from didistill.nets.inception import (  # noqa: E402
    PYTORCH_WEIGHTS,
    save_inception_params,
    variables_template,
)

FID_NUM_CLASSES = 1008  # the FID graph's classifier width; torchvision's is 1000
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_name(path: tuple[str, ...]) -> str:
    """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
    collection, *modules, leaf = path
    return ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value  # HWIO -> OIHW


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value  # OIHW -> HWIO


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The torch names and shapes that a FID Inception state dict must provide."""
    flat = traverse_util.flatten_dict(variables_template())
    return {
        torch_name(path): tuple(_to_torch_layout(np.empty(leaf.shape, np.uint8)).shape)
        for path, leaf in flat.items()
    }


def export_state_dict(variables) -> dict[str, np.ndarray]:
    """Flax variables -> torch-named arrays (the inverse of `convert_state_dict`)."""
    flat = traverse_util.flatten_dict(variables)
    return {torch_name(path): _to_torch_layout(np.asarray(v)) for path, v in flat.items()}


def _ignored(name: str) -> bool:
    return name.endswith("num_batches_tracked") or name in ("fc.weight", "fc.bias")


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """torch-named arrays -> Flax variables {'params', 'batch_stats'} (float32).

    Raises ValueError naming every missing, unexpected or mis-shaped array, and refusing
    torchvision's ImageNet Inception (AuxLogits, 1000 classes).
    """
    arrays = {name: np.asarray(value) for name, value in state_dict.items()}
    fc = arrays.get("fc.weight")
    if any(n.startswith("AuxLogits.") for n in arrays) or (
        fc is not None and fc.shape[0] != FID_NUM_CLASSES
    ):
        raise ValueError(
            "this state dict looks like torchvision's ImageNet Inception-v3 (AuxLogits or a "
            f"{None if fc is None else fc.shape[0]}-way fc), not the FID Inception: use "
            f"{PYTORCH_WEIGHTS} (pytorch-fid's FID weights, 1008-way fc, no AuxLogits)"
        )
    flat_template = traverse_util.flatten_dict(variables_template())
    expected = {torch_name(path): path for path in flat_template}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(n for n in set(arrays) - set(expected) if not _ignored(n))
    errors = []
    if missing:
        errors.append(f"{len(missing)} missing: {', '.join(missing[:8])}")
    if unexpected:
        errors.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}")
    out = {}
    for name, path in expected.items():
        if name not in arrays:
            continue
        value = _from_torch_layout(arrays[name])
        if value.shape != flat_template[path].shape:
            shape = _to_torch_layout(np.empty(flat_template[path].shape, np.uint8)).shape
            errors.append(f"{name}: shape {arrays[name].shape}, expected {shape}")
            continue
        out[path] = value.astype(np.float32)
    if errors:
        raise ValueError("not a FID Inception state dict: " + "; ".join(errors))
    return traverse_util.unflatten_dict(out)


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """Named arrays from a `.npz` (no torch needed) or a torch `.pth`/`.pt` state dict."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} not found: pass pytorch-fid's {PYTORCH_WEIGHTS} or an .npz export of it"
        )
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path!r} needs torch; install it, or export the state dict to .npz on a "
            "machine with torch (see this script's docstring) and pass the .npz"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_file(src: str, dst: str) -> str:
    """Convert `src` (.pth or .npz state dict) into the Flax `.npz` at `dst`."""
    variables = convert_state_dict(load_state_dict_file(src))
    return save_inception_params(dst, variables)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help=f"{PYTORCH_WEIGHTS}, or an .npz export of its state dict")
    parser.add_argument("dst", help="output .npz for didistill.nets.inception")
    args = parser.parse_args(argv)
    path = convert_file(args.src, args.dst)
    print(f"wrote FID Inception weights to {path}")


if __name__ == "__main__":
    main()
