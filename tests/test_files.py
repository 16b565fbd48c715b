"""Tests for didistill.nets.files: one network-file format, keyed by architecture."""

import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill import assets
from didistill.nets import files
from didistill.nets.classifier import Classifier
from didistill.nets.dit import DiT
from didistill.nets.mlp import MLPDenoiser
from didistill.nets.unet import UNetDenoiser

MLP = {"width": 8, "depth": 1, "emb_dim": 4, "sigma_data": 0.5}


def test_roundtrip_rebuilds_the_module(tmp_path):
    net = files.build(dict(MLP, arch="mlp_denoiser"))
    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))
    path = files.save_model(str(tmp_path / "t.msgpack"), params, MLP, "mlp_denoiser", toy="ring8")
    module, loaded, meta = files.load_model(path, "mlp_denoiser")
    assert module == net and meta == {"net": dict(MLP, arch="mlp_denoiser"), "toy": "ring8"}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(path + ".tmp")


def test_tuples_become_lists_and_bad_meta_writes_nothing(tmp_path):
    assert files.json_config({"widths": (3, 4), "k": "a"}) == {"widths": [3, 4], "k": "a"}
    with pytest.raises(TypeError):
        files.save_model(str(tmp_path / "x.msgpack"), {}, MLP, "mlp_denoiser", bad=object())
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="unknown network arch"):
        files.save_model(str(tmp_path / "x.msgpack"), {}, MLP, "resnet")


def test_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one"):
        files.load_model(str(tmp_path / "none.msgpack"), how_to_create="train one")
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00garbage\xff" * 5)
    with pytest.raises(ValueError, match="not a readable toy teacher file"):
        files.load_model(str(bad), what="toy teacher")
    other = tmp_path / "other.msgpack"
    other.write_bytes(flax.serialization.msgpack_serialize({"params": {"w": np.zeros(2)}}))
    with pytest.raises(ValueError, match="format tag"):
        files.load_model(str(other))
    path = files.save_model(str(tmp_path / "t.msgpack"), {}, MLP, "mlp_denoiser")
    with pytest.raises(ValueError, match="holds a 'mlp_denoiser' network, not a dit"):
        files.load_model(path, "dit")


@pytest.mark.parametrize(
    "asset,arch,cls",
    [
        ("toy/ring8_teacher.msgpack", "mlp_denoiser", MLPDenoiser),
        ("digits/teacher.msgpack", "unet", UNetDenoiser),
        ("digits/classifier_teacher.msgpack", "classifier", Classifier),
        ("text/markov_tiny_teacher.msgpack", "dit", DiT),
    ],
)
def test_shipped_files_of_the_earlier_tags_load(asset, arch, cls):
    module, params, meta = files.load_model(assets.path(asset), arch)
    assert isinstance(module, cls) and meta["net"]["arch"] == arch and jax.tree.leaves(params)
