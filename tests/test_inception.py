"""FID Inception-v3 (random weights: no download) and its PyTorch state-dict converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from didistill.nets import inception
from experiments import convert_inception as convert


@pytest.fixture(scope="module")
def variables():
    return inception.random_inception_variables(seed=0)


@pytest.fixture(scope="module")
def state_dict(variables):
    return convert.export_state_dict(variables)


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def assert_trees_equal(a, b):
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


class TestArchitecture:
    def test_template_has_the_fid_inception_layers(self):
        template = inception.variables_template()
        params = _flat(template["params"])
        kernels = [k for k in params if k.endswith("/conv/kernel")]
        assert len(kernels) == 94  # BasicConv2d layers of Inception-v3 without the aux head
        assert sum(int(np.prod(v.shape)) for v in params.values()) == 21_785_568
        assert params["Conv2d_1a_3x3/conv/kernel"].shape == (3, 3, 3, 32)
        assert params["Mixed_6b/branch7x7_2/conv/kernel"].shape == (1, 7, 128, 128)
        assert params["Mixed_7c/branch_pool/conv/kernel"].shape == (1, 1, 2048, 192)
        assert _flat(template["batch_stats"])["Mixed_5b/branch_pool/bn/var"].shape == (32,)

    def test_average_pools_ignore_the_padding(self):
        # TensorFlow SAME pooling: a constant image stays constant, corners included
        ones = jnp.ones((1, 5, 5, 2))
        np.testing.assert_allclose(inception._avg_pool_valid(ones), ones)

    def test_last_block_pools_with_max_and_the_previous_with_average(self):
        x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
        blocks = [inception.BlockE(pool) for pool in ("avg", "max")]
        template = jax.eval_shape(blocks[0].init, jax.random.key(1), x)
        variables = inception.random_variables_like(template)  # same parameters for both
        out_avg, out_max = (jax.jit(block.apply)(variables, x) for block in blocks)
        assert out_avg.shape == out_max.shape == (1, 8, 8, 2048)
        # only the 192 pool-branch channels (the last ones) differ
        np.testing.assert_array_equal(out_avg[..., :-192], out_max[..., :-192])
        assert not np.allclose(out_avg[..., -192:], out_max[..., -192:])

    def test_features_shape_determinism_and_input_dependence(self, variables):
        features = inception.inception_feature_fn(variables)
        levels = jax.random.randint(jax.random.key(0), (2, 32, 32, 3), 0, 256)  # uint8 pixels
        images = levels / 127.5 - 1.0  # [2, 32, 32, 3] in [-1, 1]
        out = features(images)  # resized to 299x299 inside
        assert out.shape == (2, inception.FEATURE_DIM) and out.dtype == jnp.float32
        assert np.all(np.isfinite(out)) and np.all(np.asarray(out) >= 0.0)  # mean of ReLUs
        np.testing.assert_array_equal(np.asarray(features(images)), np.asarray(out))
        assert not np.allclose(out[0], out[1])
        # inputs are quantised to 8 bits: a perturbation below half a level changes nothing
        np.testing.assert_array_equal(np.asarray(features(images + 0.4 / 127.5)), np.asarray(out))

    def test_rejects_a_non_rgb_input(self, variables):
        with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
            inception.InceptionV3FID().apply(variables, jnp.zeros((1, 8, 8, 1)))


class TestWeightsFile:
    def test_missing_weights_say_how_to_prepare_them(self, tmp_path):
        path = str(tmp_path / "inception_fid.npz")
        with pytest.raises(FileNotFoundError) as error:
            inception.load_inception_params(path)
        message = str(error.value)
        assert inception.PYTORCH_WEIGHTS in message
        assert f"experiments/convert_inception.py /path/to/{inception.PYTORCH_WEIGHTS}" in message
        assert path in message

    def test_wrong_files_are_refused(self, tmp_path):
        np.savez(tmp_path / "other.npz", x=np.zeros(2))
        with pytest.raises(ValueError, match="has format 'none'"):
            inception.load_inception_params(str(tmp_path / "other.npz"))
        np.savez(tmp_path / "part.npz", __format__=np.array(inception.FORMAT), x=np.zeros(2))
        with pytest.raises(ValueError, match=r"missing .*\(470\), unexpected \['x'\] \(1\)"):
            inception.load_inception_params(str(tmp_path / "part.npz"))


class TestConverter:
    def test_state_dict_names_and_shapes(self, state_dict):
        shapes = convert.state_dict_shapes()
        assert {k: v.shape for k, v in state_dict.items()} == shapes
        assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)  # [O, I, kh, kw]
        assert shapes["Mixed_7b.branch3x3_2a.conv.weight"] == (384, 384, 1, 3)
        assert shapes["Mixed_5b.branch1x1.bn.running_var"] == (64,)
        assert convert.torch_name(("batch_stats", "Mixed_6a", "branch3x3", "bn", "mean")) == (
            "Mixed_6a.branch3x3.bn.running_mean"
        )

    def test_round_trip_through_files(self, tmp_path, variables, state_dict):
        # the state dict of pytorch-fid also holds counters and the 1008-way classifier
        extra = {"fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008)}
        extra["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
        src = tmp_path / "pt_inception.npz"
        np.savez(src, **state_dict, **extra)
        dst = convert.convert_file(str(src), str(tmp_path / "inception_fid.npz"))
        loaded = inception.load_inception_params(dst)
        assert_trees_equal(loaded, variables)
        convert.main([str(src), str(tmp_path / "again.npz")])  # the command line, too
        assert_trees_equal(inception.load_inception_params(str(tmp_path / "again.npz")), loaded)

    def test_missing_unexpected_and_misshaped_arrays(self, state_dict):
        broken = dict(state_dict)
        del broken["Mixed_6e.branch_pool.bn.running_mean"]
        broken["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3))
        broken["Mixed_8a.conv.weight"] = np.zeros(1)
        with pytest.raises(ValueError) as error:
            convert.convert_state_dict(broken)
        message = str(error.value)
        assert "1 missing: Mixed_6e.branch_pool.bn.running_mean" in message
        assert "1 unexpected: Mixed_8a.conv.weight" in message
        shape_error = "shape (64, 192, 3, 3), expected (64, 192, 1, 1)"
        assert f"Mixed_5b.branch1x1.conv.weight: {shape_error}" in message

    def test_refuses_torchvision_imagenet_weights(self, state_dict):
        with pytest.raises(ValueError, match="torchvision's ImageNet Inception"):
            convert.convert_state_dict({**state_dict, "fc.weight": np.zeros((1000, 2048))})
        with pytest.raises(ValueError, match="AuxLogits"):
            convert.convert_state_dict({**state_dict, "AuxLogits.fc.bias": np.zeros(1000)})

    def test_source_file_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=inception.PYTORCH_WEIGHTS):
            convert.load_state_dict_file(str(tmp_path / "absent.pth"))
        pth = tmp_path / "weights.pth"
        pth.write_bytes(b"")
        try:
            import torch  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="needs torch.*export the state dict to .npz"):
                convert.load_state_dict_file(str(pth))
