"""Inception FID of a one-step generator (didistill.eval.generator_fid): the float64 merge of
per-host statistics against NumPy/SciPy on the concatenation, sample-index determinism under
any batching, the protocol record, and one clear error per bad input."""

import numpy as np
import pytest
import scipy.linalg

from didistill.distill.one_step.image_generator import from_network_file
from didistill.eval import fid
from didistill.eval import generator_fid as gf
from didistill.train import files as train_files
from didistill.train.errors import ConfigError
from tests.fid_files import FEATURES, fid_files, save_feature_net, save_reference


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


class FakeHosts:
    """`gather` for `merge_over_processes`: stacks the arrays every simulated host sends, in
    the order the function asks for them (count, mean, m2)."""

    def __init__(self, host_stats):
        self.hosts, self.calls = host_stats, 0

    def __call__(self, array):
        what = ("count", "mean", "m2")[self.calls]
        self.calls += 1
        if what == "count":
            return np.stack([np.asarray([h.count], np.int32) for h in self.hosts])
        return np.stack([gf._split64(getattr(h, what)) for h in self.hosts])


class TestFloat64Merge:
    def test_split64_keeps_float64_precision(self):
        x = np.random.default_rng(0).standard_normal(1000) * 1e3 + 1e5
        parts = gf._split64(x)
        assert parts.dtype == np.float32
        np.testing.assert_allclose(parts[0].astype(np.float64) + parts[1], x, rtol=1e-13)

    @pytest.mark.parametrize("hosts", [1, 3, 4])
    def test_merged_hosts_equal_numpy_on_the_concatenation(self, hosts):
        rng = np.random.default_rng(hosts)
        # features with a large common offset: the case where sum f f^T - N mu mu^T cancels
        features = rng.standard_normal((600, 12)) @ rng.standard_normal((12, 12)) + 50.0
        chunks = np.array_split(features, hosts)
        host_stats = []
        for chunk in chunks:  # each host streams its share in batches of 64, in float32
            stats = fid.FeatureStats()
            for s in range(0, len(chunk), 64):
                stats.update(chunk[s : s + 64].astype(np.float32))
            host_stats.append(stats)
        merged = gf.merge_over_processes(host_stats[0], gather=FakeHosts(host_stats))
        assert merged.count == 600
        flat = np.concatenate(chunks).astype(np.float32).astype(np.float64)
        mu, sigma = merged.mean_cov()
        np.testing.assert_allclose(mu, flat.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(flat, rowvar=False), rtol=1e-9, atol=1e-9)
        ref_mu, ref_sigma = flat[:300].mean(0) + 0.1, np.cov(flat[:300], rowvar=False) * 1.1
        expected = scipy_fid(flat.mean(0), np.cov(flat, rowvar=False), ref_mu, ref_sigma)
        got = fid.fid_from_stats(merged, (ref_mu, ref_sigma))
        np.testing.assert_allclose(got, expected, rtol=1e-7)

    def test_one_process_returns_the_stats(self):
        stats = fid.FeatureStats().update(np.ones((3, 2)))
        assert gf.merge_over_processes(stats) is stats


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return fid_files(tmp_path_factory.mktemp("fid"), label_dim=10)


class TestGeneratorFID:
    def test_matches_a_direct_numpy_computation_at_any_batch_size(self, files):
        teacher, features_path, reference = files
        generator, params = from_network_file(teacher, sigma=2.5)
        settings = gf.FIDSettings(features_path, reference, num_samples=16, seeds=2, batch_size=8)
        out = gf.evaluate_fid(generator, params, settings, generator.image_shape, 10)
        # the same samples, drawn by hand: index j's noise and label depend on j alone
        features, _ = gf.load_feature_network(features_path, generator.image_shape)
        mu_ref, sigma_ref = fid.load_stats(reference)
        expected = []
        for s in range(2):
            z, y = gf.sample_inputs(np.arange(16 * s, 16 * (s + 1)), generator.image_shape, 10)
            f = np.asarray(features(generator(params, z, y)), np.float64)
            expected.append(scipy_fid(f.mean(0), np.cov(f, rowvar=False), mu_ref, sigma_ref))
        np.testing.assert_allclose(out["fid_per_seed_set"], expected, rtol=1e-4)
        assert out["fid"] == out["fid_min"] == min(out["fid_per_seed_set"])
        np.testing.assert_allclose(out["fid_mean"], np.mean(expected), rtol=1e-4)
        protocol = out["fid_protocol"]
        assert protocol["num_samples"] == 16 and protocol["seed_sets"] == 2
        assert protocol["sample_indices"] == [[0, 15], [16, 31]]
        assert protocol["reference"]["sha256"] == train_files.sha256_file(reference)
        assert protocol["reference"]["resolution"] == 8
        assert protocol["feature_network"]["features"] == FEATURES
        one_batch = gf.evaluate_fid(
            generator, params, settings.replace(batch_size=16), generator.image_shape, 10
        )
        np.testing.assert_allclose(one_batch["fid_per_seed_set"], expected, rtol=1e-4)

    def test_inception_weights_file_gives_2048_features_of_grey_images(self, tmp_path):
        from didistill.nets import inception

        path = inception.save_inception_params(
            str(tmp_path / "inception.npz"), inception.random_inception_variables(0)
        )
        features, info = gf.load_feature_network(path, (8, 8, 1))
        out = features(np.zeros((2, 8, 8, 1), np.float32))  # repeated to RGB, resized
        assert out.shape == (2, 2048) and info["kind"] == "inception_v3_pool3"


class TestBadInput:
    def test_missing_feature_network(self, files, tmp_path):
        with pytest.raises(ConfigError, match=r"config\.eval\.fid\.inception=.*prepare inception"):
            gf.load_feature_network(str(tmp_path / "nope.npz"), (8, 8, 3))

    def test_missing_reference(self, tmp_path):
        with pytest.raises(ConfigError, match=r"config\.eval\.fid\.reference=.*fid-refs"):
            gf.load_reference(str(tmp_path / "nope.npz"), 8, FEATURES)

    def test_reference_of_another_resolution(self, files, tmp_path):
        _, features_path, reference = files
        with pytest.raises(ConfigError, match=r"8x8 images, but the generator makes 32x32"):
            gf.load_reference(reference, 32, FEATURES)
        # EDM's files carry the resolution in their name only
        named = tmp_path / "cifar10-32x32.npz"
        mu, sigma = fid.load_stats(reference)
        fid.save_stats(str(named), mu, sigma)
        with pytest.raises(ConfigError, match=r"cifar10-32x32\.npz.*32x32 images.*makes 8x8"):
            gf.load_reference(str(named), 8, FEATURES)

    def test_reference_of_another_feature_network(self, files, tmp_path):
        other = save_feature_net(tmp_path / "wide.msgpack", width=FEATURES + 2)
        reference = save_reference(tmp_path / "wide.npz", other)
        with pytest.raises(ConfigError, match=r"has 8 features.*gives 6"):
            gf.load_reference(reference, 8, FEATURES)

    def test_sample_count_not_divisible_by_the_devices(self):
        with pytest.raises(ConfigError, match=r"num_samples=10 does not split over the 4 dev"):
            gf.check_divisible(10, 8, num_devices=4)
        with pytest.raises(ConfigError, match=r"batch_size=6 does not split over the 4 dev"):
            gf.check_divisible(8, 6, num_devices=4)

    def test_bad_settings(self):
        from ml_collections import ConfigDict

        block = ConfigDict(dict(fid=dict(inception="x", reference="", num_samples=4)))
        with pytest.raises(ConfigError, match=r"config\.eval\.fid\.reference is empty"):
            gf.FIDSettings.from_config(block)
        block.fid.reference, block.fid.num_samples = "r", 0
        with pytest.raises(ConfigError, match=r"num_samples=0 is invalid"):
            gf.FIDSettings.from_config(block)
        assert gf.FIDSettings.from_config(ConfigDict(dict(fid=dict(inception="")))) is None


SHARDED = """
import json, pathlib, sys
import jax
sys.path.insert(0, {root!r})
from tests.fid_files import fid_files
from didistill.eval import generator_fid as gf
from didistill.distill.one_step.image_generator import from_network_file
teacher, feats, ref = fid_files(pathlib.Path({tmp!r}), label_dim=10)
g, p = from_network_file(teacher, 2.5)
s = gf.FIDSettings(feats, ref, num_samples=16, seeds=1, batch_size=8)
# inside a caller's mesh with Explicit axes: the FID uses its own (Auto) mesh of local devices
with jax.set_mesh(jax.make_mesh((jax.device_count(),), ("data",))):
    out = gf.evaluate_fid(g, p, s, g.image_shape, 10)
print("RESULT", jax.device_count(), json.dumps(out["fid_per_seed_set"]))
"""


def test_four_devices_give_the_one_device_fid(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = SHARDED.format(root=root, tmp=str(tmp_path))
    values = {}
    for devices in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=root
        )
        assert out.returncode == 0, out.stderr[-2000:]
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
        _, count, fids = line.split(" ", 2)
        assert int(count) == devices
        values[devices] = json.loads(fids)
    np.testing.assert_allclose(values[4], values[1], rtol=1e-6)
