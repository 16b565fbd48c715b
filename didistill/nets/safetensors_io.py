"""A NumPy reader and writer of the safetensors format (no torch, no `safetensors` package).

The format (huggingface/safetensors, "Format" in its README): an unsigned little-endian 64-bit
integer N, then N bytes of UTF-8 JSON mapping each tensor name to {'dtype', 'shape',
'data_offsets': [begin, end]} (offsets into the byte buffer that follows the header; an
optional '__metadata__' entry maps strings to strings), then the buffer itself, each tensor
stored C-contiguous little-endian. bfloat16 has no NumPy dtype: it is read as the top 16 bits
of a float32 (exact) and written by rounding float32 to nearest even.

Published checkpoints on the Hugging Face Hub (`model.safetensors` of `kuleshov-group/mdlm-owt`
and of `gpt2-large`) are read with `read_safetensors`; the tests write their own small files
with `write_safetensors`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
    return (rounded >> 16).astype(np.uint16)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: array} of a .safetensors file (bfloat16 tensors come back as float32).

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for a file
    that is not safetensors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a safetensors file ({err})") from None
    buffer = memoryview(blob)[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype, shape = info["dtype"], tuple(info["shape"])
        chunk = buffer[begin:end]
        if dtype == "BF16":
            array = _bf16_to_f32(np.frombuffer(chunk, "<u2"))
        elif dtype in _DTYPES:
            array = np.frombuffer(chunk, np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        out[name] = np.array(array.reshape(shape))
    return out


def write_safetensors(
    path: str,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    bfloat16: bool = False,
) -> str:
    """Writes {name: array} as safetensors (float32 as BF16 when `bfloat16`); returns path."""
    header, chunks, offset = {}, [], 0
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        if bfloat16 and value.dtype == np.float32:
            raw, dtype = _f32_to_bf16(value).astype("<u2").tobytes(), "BF16"
        else:
            if value.dtype not in _NAMES:
                raise ValueError(f"tensor {name!r}: dtype {value.dtype} cannot be written")
            raw, dtype = value.astype(value.dtype.newbyteorder("<")).tobytes(), _NAMES[value.dtype]
        header[name] = {"dtype": dtype, "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # 8-byte alignment of the buffer
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
    return path


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """{name: array} of a torch file (pytorch_model.bin, a Lightning .ckpt: its 'state_dict');
    needs torch, an optional dependency."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (pip install torch), or convert it to .safetensors"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items() if hasattr(v, "detach")}  # fmt: skip


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file with NumPy, anything else (torch pickles) through torch."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return read_torch_checkpoint(path)


__all__ = ["read_checkpoint", "read_safetensors", "read_torch_checkpoint", "write_safetensors"]
