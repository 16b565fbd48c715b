"""Memory of the train state of the shipped large configs, replicated vs FSDP (docs/scale.md).

    python benchmarks/memory_table.py [--devices=8]

Prints a markdown table. Everything comes from `jax.eval_shape` of the real method's `init`
(`didistill.distill.get_method(config)`), so nothing big is allocated and no data, teacher
file or tokenizer is needed: the teacher U-Net is an abstract `param_template` handed to the
method in place of `load_teacher_unet`, and OpenWebText's GPT-2 tokenizer is replaced by its
vocabulary size (50,257). The FSDP column applies the engine's own rule
(`didistill.train.sharding.leaf_sharding`, over an `AbstractMesh` of `--devices` devices on
'data'): a leaf whose largest dimension divides by the device count holds 1/N per device.

Counted: the train state (every trained network's params, its Adam/AdamW moments, the EMA
copy, small buffers) and, for distillation, the frozen teacher, which the method closes over
and which therefore stays replicated on every device in both columns. Not counted:
activations, gradients and XLA temporaries, which depend on the batch per device.
"""

from __future__ import annotations

import argparse
import importlib.util
from unittest import mock

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from didistill.distill import get_method
from didistill.distill.one_step import images as one_step_images
from didistill.nets import convert_edm
from didistill.train import sharding

GPT2_VOCAB = 50_257

# ImageNet-64: no DDPM++ preset ships (EDM's released network is ADM, see the config's
# docstring). Stand-in: a DDPM++ U-Net with ADM's ImageNet-64 widths (192 x [1, 2, 3, 4],
# 3 blocks a level, attention at 32, 16, 8), 1000 classes; it has the 8x8 level the config's
# discriminator reads.
IMAGENET64_UNET = dict(
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    channel_mult_emb=4,
    num_blocks=3,
    attn_resolutions=[32, 16, 8],
    dropout=0.1,
    augment_dim=0,
    label_dim=1000,
    img_resolution=64,
    img_channels=3,
)

# (label, config file, config arg, teacher U-Net config or None)
ROWS = (
    ("CIFAR-10 f-distill", "cifar10_distill", None, "edm-cifar10-cond"),
    ("ImageNet-64 f-distill", "imagenet64_distill", None, IMAGENET64_UNET),
    ("OWT MDLM teacher", "owt_mdlm", None, None),
)


def load_config(name: str, arg: str | None):
    module = importlib.import_module(f"didistill.configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


def abstract_state(config, teacher):
    """(abstract method state, abstract teacher variables or None) of `config`'s method."""
    key = jax.random.key(0)
    if teacher is None:  # the MDLM teacher: only the tokenizer's vocabulary size is needed
        tokenizer = mock.Mock(vocab_size=GPT2_VOCAB)
        with mock.patch("didistill.data.text.get_tokenizer", return_value=tokenizer):
            method = get_method(config)
        return jax.eval_shape(method.init, key), None
    net_config = convert_edm.PRESETS[teacher] if isinstance(teacher, str) else teacher
    net, image_shape = convert_edm.unet_from_config(net_config)
    teacher_vars = convert_edm.param_template(net, image_shape)

    # The method is built outside the trace (its factory computes NumPy constants) around a
    # dict that the traced init fills with the abstract teacher variables.
    slot: dict = {}
    loader = lambda path: (net, slot, image_shape)  # noqa: E731
    with mock.patch.object(one_step_images, "load_teacher_unet", loader):
        method = get_method(config)

    def init(variables):
        slot.update(variables)
        try:  # copy the containers: the generator may be `slot` itself (init from teacher)
            return jax.tree.map(lambda x: x, method.init(key))
        finally:
            slot.clear()

    return jax.eval_shape(init, teacher_vars), teacher_vars


def nbytes(leaf) -> int:
    return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def fsdp_bytes(tree, devices: int) -> int:
    """Bytes per device with the engine's FSDP rule over `devices` devices on 'data'."""
    mesh = AbstractMesh((devices,), (sharding.DATA_AXIS,), axis_types=(AxisType.Auto,))
    total = 0
    for leaf in jax.tree.leaves(tree):
        spec = sharding.leaf_sharding(tuple(leaf.shape), mesh, (sharding.DATA_AXIS,))
        total += int(np.prod(spec.shard_shape(tuple(leaf.shape)))) * np.dtype(leaf.dtype).itemsize
    return total


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def describe(state) -> str:
    """The state's fields with their parameter counts, e.g. 'generator 55.7M, ...'."""
    fields = state.__dict__ if hasattr(state, "__dict__") else state._asdict()
    parts = [f"{name} {count(value) / 1e6:.1f}M" for name, value in fields.items()]
    return ", ".join(p for p in parts if not p.endswith(" 0.0M"))


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    devices = parser.parse_args().devices
    if devices < 1:
        parser.error(f"--devices={devices}: must be >= 1")
    print(
        f"| config | trained params | state contents (element counts) | state GiB | teacher "
        f"(frozen) GiB | per device, replicated GiB | per device, FSDP x{devices} GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, path, arg, teacher in ROWS:
        config = load_config(path, arg)
        state, teacher_vars = abstract_state(config, teacher)
        params = state.params if hasattr(state, "params") else None
        trained = (
            count(params)
            if params is not None
            else count((state.generator, state.fake_score, state.discriminator))
        )
        state_bytes = sum(nbytes(x) for x in jax.tree.leaves(state))
        teacher_bytes = sum(nbytes(x) for x in jax.tree.leaves(teacher_vars or {}))
        print(
            f"| {label} | {trained / 1e6:.1f}M | {describe(state)} | {gib(state_bytes)} | "
            f"{gib(teacher_bytes) if teacher_vars else '-'} | "
            f"{gib(state_bytes + teacher_bytes)} | "
            f"{gib(fsdp_bytes(state, devices) + teacher_bytes)} |"
        )


if __name__ == "__main__":
    main()
