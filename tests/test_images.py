"""Tests for didistill.data.images: the digits builder, the offline loader, the batch stream."""

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from sklearn.datasets import load_digits

from didistill.data import images


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    images.prepare_digits(str(path))
    return str(path)


class FakeCifar(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Ten CIFAR-shaped PNG images, prepared here and placed where cifar10 would live."""

    VERSION = tfds.core.Version("3.0.2")
    code_path = epath.Path(__file__)

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        import PIL.Image

        for i in range(n):
            buf = io.BytesIO()
            PIL.Image.fromarray(np.full((32, 32, 3), 51 * (i % 6), np.uint8)).save(buf, "PNG")
            yield i, {"image": buf.getvalue(), "label": i}


class TestDigits:
    def test_split_indices(self):
        train, test = images.digits_split_indices()
        assert len(train) == 1500 and len(test) == 297
        assert np.intersect1d(train, test).size == 0
        np.testing.assert_array_equal(np.union1d(train, test), np.arange(1797))
        target = load_digits().target
        share = np.bincount(target[test], minlength=10) / np.bincount(target, minlength=10)
        assert np.all(np.abs(share - 297 / 1797) < 0.01)  # stratified
        again = images.digits_split_indices()
        np.testing.assert_array_equal(again[1], test)

    def test_prepared_split_matches_sklearn(self, data_dir):
        version_dir = images.find_prepared("digits8x8", data_dir)
        assert version_dir == os.path.join(data_dir, "digits8x8", "1.0.0")
        source = tfds.builder_from_directory(version_dir).as_data_source(split="test")
        rows = np.sort([int(ex["index"]) for ex in source])
        np.testing.assert_array_equal(rows, images.digits_split_indices()[1])
        digits = load_digits()
        example = source[0]
        np.testing.assert_array_equal(example["image"][..., 0], digits.images[example["index"]])
        assert example["label"] == digits.target[example["index"]]

    def test_load(self, data_dir):
        train = images.load_images("digits", "train", data_dir)
        test = images.load_images("digits8x8", "test", data_dir)
        assert (len(train), len(test)) == (1500, 297)
        assert train.num_classes == 10 and train.image_shape == (8, 8, 1)
        arrays = train.to_arrays()
        assert arrays["image"].shape == (1500, 8, 8, 1) and arrays["image"].dtype == np.float32
        assert arrays["image"].min() == -1.0 and arrays["image"].max() == 1.0
        assert arrays["label"].dtype == np.int32 and set(arrays["label"]) == set(range(10))
        pixel_values = np.unique(arrays["image"])  # the 17 levels k / 8 - 1
        np.testing.assert_allclose(pixel_values, np.arange(17) / 8 - 1, atol=1e-6)
        assert "tensorflow" not in sys.modules

    def test_resolution(self, data_dir):
        native = images.load_images("digits", "test", data_dir).get_batch([0, 5])
        big = images.load_images("digits", "test", data_dir, resolution=16)
        assert big.image_shape == (16, 16, 1)
        up = big.get_batch([0, 5])
        assert up["image"].shape == (2, 16, 16, 1)
        pooled = up["image"].reshape(2, 8, 2, 8, 2, 1).mean(axis=(2, 4))
        np.testing.assert_allclose(pooled, native["image"])
        small = images.load_images("digits", "test", data_dir, resolution=4).get_batch([0])
        assert small["image"].shape == (1, 4, 4, 1)
        with pytest.raises(ValueError, match="multiple or a divisor"):
            images.load_images("digits", "test", data_dir, resolution=12)

    def test_prepare_does_not_overwrite(self, data_dir):
        version_dir = os.path.join(data_dir, "digits8x8", "1.0.0")
        stamps = {
            f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)
        }
        assert images.prepare_digits(data_dir) == version_dir
        images.load_images("digits", "train", data_dir)
        after = {
            f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)
        }
        assert after == stamps

    def test_bad_names(self, data_dir):
        with pytest.raises(ValueError, match="unknown image dataset"):
            images.load_images("mnist", "train", data_dir)
        with pytest.raises(ValueError, match="splits"):
            images.load_images("digits", "validation", data_dir)


class TestPreparedElsewhere:
    @pytest.mark.parametrize(
        "name,tfds_name", [("cifar10", "cifar10"), ("imagenet64", "imagenet_resized/64x64")]
    )
    def test_missing_data_error(self, tmp_path, name, tfds_name):
        with pytest.raises(images.DatasetNotPreparedError) as err:
            images.load_images(name, "train", str(tmp_path))
        assert isinstance(err.value, FileNotFoundError)
        message = str(err.value)
        assert f"tfds build {tfds_name} --data_dir=" in message
        assert "--file_format=array_record" in message and str(tmp_path) in message
        assert "--config.data.data_dir=" in message

    def test_reads_prepared_png_dataset_without_tensorflow(self, tmp_path):
        builder = FakeCifar(data_dir=str(tmp_path / "prep"), file_format="array_record")
        builder.download_and_prepare()
        os.makedirs(tmp_path / "data" / "cifar10")
        shutil.copytree(builder.data_dir, tmp_path / "data" / "cifar10" / "3.0.2")
        source = images.load_images("cifar10", "train", str(tmp_path / "data"))
        assert len(source) == 6 and source.image_shape == (32, 32, 3)
        arrays = source.to_arrays()
        order = np.argsort(arrays["label"])
        np.testing.assert_allclose(
            arrays["image"][order, 0, 0, 0], np.arange(6) * 51 / 127.5 - 1, rtol=1e-6
        )
        assert "tensorflow" not in sys.modules

    def test_non_array_record_format(self, data_dir, tmp_path):
        version_dir = tmp_path / "cifar10" / "3.0.2"
        shutil.copytree(os.path.join(data_dir, "digits8x8", "1.0.0"), version_dir)
        info_path = version_dir / "dataset_info.json"
        info = json.loads(info_path.read_text())
        info["fileFormat"] = "tfrecord"
        info_path.write_text(json.dumps(info))
        with pytest.raises(images.DatasetNotPreparedError, match="tfds convert_format"):
            images.load_images("cifar10", "train", str(tmp_path))


class TestBatches:
    def test_deterministic_and_resumable(self, data_dir):
        source = images.load_images("digits", "train", data_dir)
        arrays = source.to_arrays()
        stream = images.image_batches(arrays, seed=3, batch_size=16, start_step=0)
        first = [next(stream) for _ in range(5)]
        resumed = images.image_batches(arrays, seed=3, batch_size=16, start_step=3)
        for want in first[3:]:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
        assert first[0]["image"].shape == (16, 8, 8, 1) and first[0]["label"].shape == (16,)
        assert not np.array_equal(first[0]["label"], first[1]["label"])
        from_source = next(images.image_batches(source, seed=3, batch_size=16, start_step=0))
        np.testing.assert_array_equal(from_source["image"], first[0]["image"])
        other_shard = next(images.image_batches(arrays, 3, 16, start_step=0, shard=1))
        other_seed = next(images.image_batches(arrays, 4, 16, start_step=0))
        assert not np.array_equal(other_shard["label"], first[0]["label"])
        assert not np.array_equal(other_seed["label"], first[0]["label"])
