"""Image datasets through tensorflow-datasets, read without TensorFlow, plus a batch stream.

Every dataset is read the same way: a prepared tfds dataset in `array_record` format under a
caller-given `data_dir` is opened with `tfds.builder_from_directory(...).as_data_source(split)`,
a random-access sequence that needs neither TensorFlow nor a network.
Examples come back as {'image': float32 [N, H, W, C] in [-1, 1], 'label': int32 [N]}.

Datasets (`load_images(name, ...)` names):

- 'digits': scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, pixel
  values 0..16; Alpaydin & Kaynak, UCI "Optical Recognition of Handwritten Digits"). It ships
  with scikit-learn, so it is prepared locally by the `Digits8x8` builder: `load_images`
  prepares it automatically into `data_dir/digits8x8/1.0.0` the first time (a few seconds,
  nothing downloaded), or call `prepare_digits(data_dir)` yourself (do that once before a
  multi-host run whose hosts share `data_dir`). Scaling: x / 8 - 1.
  Fixed split, stored in the prepared dataset: per class, a `np.random.RandomState(0)`
  permutation (a frozen legacy stream, identical on every NumPy) puts the first t_c images in
  'test', with t_c the largest-remainder apportionment of 297 test images over the classes
  in proportion to their sizes: 1,500 'train' / 297 'test', stratified. Each example keeps its
  row in `load_digits()` as 'index'.
- 'cifar10': tfds `cifar10` (32x32x3, 10 classes, 'train' 50,000 / 'test' 10,000).
- 'imagenet64' = tfds `imagenet_resized/64x64` (64x64x3, 1,000 classes, 'train' 1,281,167 /
  'validation' 50,000; Chrabaszcz, Loshchilov, Hutter 2017). tfds' other 64x64 ImageNet,
  `downsampled_imagenet/64x64`, has no labels, so it cannot serve class-conditional EDM.

Those two must be prepared by the user on a connected machine (see `DatasetNotPreparedError`):
an unprepared dataset raises one error saying which command to run and where to put the
result. Resolution: `resolution=None` keeps the native size; an integer multiple of it
upsamples by pixel repetition (nearest neighbour: 'digits' at 16 gives each pixel a 2x2 block,
so a U-Net can downsample three times, 16 -> 8 -> 4) and an integer divisor average-pools.

Class imbalance: `config.data.imbalance = R` (> 1; 0 = off) makes `load_arrays` return the
split subsampled to geometric class frequencies with max/min ratio R, rows chosen by
`config.data.imbalance_seed` (`didistill.data.imbalance`; digits train at R = 30: 462 images,
149 zeros down to 5 nines). Every split is subsampled the same way (the test split too, so a
run's FID reference has the training frequencies).

`image_batches` turns arrays or a source into the per-step batch stream that the training
engine asks of a method (`didistill.train.method`): batch `step` is drawn with replacement by
`np.random.default_rng([seed, shard, step])`, so it depends on (seed, shard, step) only and a
resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

DIGITS_TFDS_NAME = "digits8x8"
DIGITS_VERSION = "1.0.0"
DIGITS_NUM_TEST = 297
DIGITS_SPLIT_SEED = 0

# load_images name -> (tfds name, splits, maximum raw pixel value, number of classes).
DATASETS: dict[str, tuple[str, tuple[str, ...], int, int]] = {
    "digits": (DIGITS_TFDS_NAME, ("train", "test"), 16, 10),
    "cifar10": ("cifar10", ("train", "test"), 255, 10),
    "imagenet64": ("imagenet_resized/64x64", ("train", "validation"), 255, 1000),
}
ALIASES = {DIGITS_TFDS_NAME: "digits", "imagenet_resized/64x64": "imagenet64"}


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is not prepared (in array_record format) under the given data_dir."""


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices into `sklearn.datasets.load_digits()`, sorted, 1500 / 297.

    Stratified: class c of size n_c gets t_c test rows, t_c = floor(297 n_c / N) plus one for
    the classes with the largest remainders (ties: lower class first), the rows being the
    first t_c of a RandomState(0) permutation of that class's rows.
    """
    from sklearn.datasets import load_digits

    target = load_digits().target  # [1797]
    classes, counts = np.unique(target, return_counts=True)
    quota = DIGITS_NUM_TEST * counts / counts.sum()  # [10]
    num_test = np.floor(quota).astype(int)
    order = np.argsort(-(quota - num_test), kind="stable")
    num_test[order[: DIGITS_NUM_TEST - num_test.sum()]] += 1
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test = [
        rng.permutation(np.flatnonzero(target == c))[:t]
        for c, t in zip(classes, num_test, strict=True)
    ]
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(target.shape[0]), test)
    return train, test


class Digits8x8(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits as a tfds dataset: 'train' 1500 / 'test' 297 (stratified).

    Features: 'image' uint8 [8, 8, 1] with values 0..16 (stored raw, no PNG, so no image codec
    is needed), 'label' ClassLabel(10), 'index' int32 (row in `load_digits()`).
    Prepare with `prepare_digits(data_dir)`; it is built in array_record format.
    """

    VERSION = tfds.core.Version(DIGITS_VERSION)
    # tfds finds a builder's folder (for checksums.tsv) through `importlib_resources` when the
    # builder lives in a package, which fails where that backport is not installed; naming
    # the file directly avoids that lookup (there is nothing to checksum anyway).
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {DIGITS_VERSION: "sklearn load_digits, stratified 1500/297 split (seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        # dataset_info_from_configs wants metadata files beside the builder; this does not.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's bundled 8x8 handwritten digits, values 0..16.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/"
            "sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        train, test = digits_split_indices()
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, rows):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]  # [1797, 8, 8, 1], values 0..16
        for row in rows:
            row = int(row)
            label = int(digits.target[row])
            yield row, {"image": images[row], "label": label, "index": row}


def prepare_digits(data_dir: str) -> str:
    """Prepares `Digits8x8` under `data_dir` (array_record) unless it is already prepared.

    Idempotent: a prepared dataset is never rebuilt nor overwritten. Returns the version dir,
    `data_dir/digits8x8/1.0.0`.
    """
    builder = Digits8x8(data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    return os.fspath(builder.data_dir)


def _prepare_hint(tfds_name: str, data_dir: str) -> str:
    return (
        "This machine cannot download. On a machine with network access (and TensorFlow), run\n"
        "    pip install tensorflow tensorflow-datasets==4.9.10\n"
        f"    tfds build {tfds_name} --data_dir=PREP_DIR --file_format=array_record\n"
        f"(or tfds.builder({tfds_name!r}, data_dir=PREP_DIR, file_format='array_record')"
        ".download_and_prepare()), then copy the folder PREP_DIR/"
        f"{tfds_name.split('/')[0]} to {os.path.join(data_dir, tfds_name.split('/')[0])} here "
        f"and pass that data_dir (--config.data.data_dir={data_dir})."
    )


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def find_prepared(tfds_name: str, data_dir: str) -> str | None:
    """The newest prepared version dir `data_dir/<name>[/<config>]/<x.y.z>`, or None."""
    root = os.path.join(os.fspath(data_dir), *tfds_name.split("/"))
    if not os.path.isdir(root):
        return None
    versions = [
        v
        for v in os.listdir(root)
        if re.fullmatch(r"\d+\.\d+\.\d+", v)
        and os.path.isfile(os.path.join(root, v, "dataset_info.json"))
    ]
    if not versions:
        return None
    return os.path.join(root, max(versions, key=_version_key))


class ImageSource:
    """Random-access images of one split: `get_batch(indices)` decodes and scales on demand.

    Attributes: `name`, `split`, `num_examples`, `num_classes`, `image_shape` (H, W, C).
    """

    def __init__(self, name, split, data_source, max_value, num_classes, resolution=None):
        self.name, self.split = name, split
        self._source, self._max_value = data_source, float(max_value)
        self.num_classes = num_classes
        self.num_examples = len(data_source)
        h, w, c = np.asarray(data_source[0]["image"]).shape
        if resolution is not None and not (resolution % h == 0 or h % resolution == 0):
            raise ValueError(
                f"resolution {resolution} must be a multiple or a divisor of {name}'s native "
                f"size {h}"
            )
        size = h if resolution is None else int(resolution)
        self.image_shape = (size, size * w // h, c)

    def __len__(self) -> int:
        return self.num_examples

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """{'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B]} for these rows."""
        examples = self._source.__getitems__([int(i) for i in indices])
        raw = np.stack([np.asarray(ex["image"]) for ex in examples])  # [B, h, w, C]
        labels = np.asarray([ex["label"] for ex in examples], np.int32)  # [B]
        image = raw.astype(np.float32) / np.float32(self._max_value / 2) - 1.0  # exact at ends
        return {"image": _resize(image, self.image_shape[0]), "label": labels}

    def to_arrays(self, max_examples: int | None = None) -> dict[str, np.ndarray]:
        """The first `max_examples` (default all) examples as in-memory arrays."""
        n = self.num_examples if max_examples is None else min(max_examples, self.num_examples)
        chunks = [self.get_batch(range(s, min(s + 4096, n))) for s in range(0, n, 4096)]
        return {k: np.concatenate([c[k] for c in chunks]) for k in ("image", "label")}


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Integer-factor resize of [B, h, w, C]: nearest upsampling or average pooling."""
    h = image.shape[1]
    if size > h:
        factor = size // h
        return image.repeat(factor, axis=1).repeat(factor, axis=2)
    if size < h:
        factor = h // size
        b, _, w, c = image.shape
        blocks = image.reshape(b, size, factor, w // factor, factor, c)
        return blocks.mean(axis=(2, 4))
    return image


def load_images(name: str, split: str, data_dir: str, resolution: int | None = None) -> ImageSource:
    """Opens one split of a prepared image dataset, without TensorFlow and offline.

    Args:
      name: 'digits', 'cifar10' or 'imagenet64' (also the tfds names 'digits8x8' and
        'imagenet_resized/64x64').
      split: a split of that dataset ('train', 'test'; ImageNet: 'train', 'validation').
      data_dir: the tfds data_dir (from the config). 'digits' is prepared into it when absent.
      resolution: None for the native size, or an integer multiple / divisor of it.

    Returns:
      An `ImageSource`; `.to_arrays()` gives {'image': float32 [N, H, W, C] in [-1, 1],
      'label': int32 [N]}, `.get_batch(indices)` the same for chosen rows.

    Raises:
      DatasetNotPreparedError: the dataset is not prepared (in array_record format) there;
        the message says how to prepare it.
    """
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; known: {sorted(DATASETS)}")
    tfds_name, splits, max_value, num_classes = DATASETS[key]
    if split not in splits:
        raise ValueError(f"{key} has splits {splits}, not {split!r}")
    data_dir = os.fspath(data_dir)
    version_dir = find_prepared(tfds_name, data_dir)
    if version_dir is None and key == "digits":
        version_dir = prepare_digits(data_dir)
    if version_dir is None:
        raise DatasetNotPreparedError(
            f"{tfds_name} is not prepared under data_dir={data_dir} (no "
            f"{os.path.join(data_dir, tfds_name, '<version>', 'dataset_info.json')}). "
            + _prepare_hint(tfds_name, data_dir)
        )
    builder = tfds.builder_from_directory(version_dir)
    try:
        source = builder.as_data_source(split=split)
    except (NotImplementedError, ValueError) as err:
        raise DatasetNotPreparedError(
            f"{version_dir} is not readable without TensorFlow ({err}). It must be in "
            "array_record format: convert it where TensorFlow is installed with\n"
            f"    tfds convert_format --dataset_version_dir={version_dir} "
            "--out_file_format=array_record\nor prepare it again. "
            + _prepare_hint(tfds_name, data_dir)
        ) from err
    return ImageSource(key, split, source, max_value, num_classes, resolution)


def resolve_data_dir(data_dir: str) -> str:
    """`data_dir`, or $TFDS_DATA_DIR, or ~/tensorflow_datasets (tfds' own default), expanded."""
    return os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    )


@functools.lru_cache(maxsize=8)
def _cached_source(name: str, split: str, data_dir: str, resolution: int | None):
    return load_images(name, split, resolve_data_dir(data_dir), resolution)


def load_arrays(data_cfg, split: str = "train", max_in_memory: int = 100_000):
    """One split of `config.data` (keys name, data_dir, resolution, and optionally imbalance,
    imbalance_seed), cached per process: {'image': [N, H, W, C], 'label': [N]} in memory when
    it has at most `max_in_memory` examples, else the `ImageSource` (random access, for
    ImageNet). `imbalance` > 1 subsamples the in-memory split to geometric class frequencies
    (`didistill.data.imbalance`); 0 or 1 keeps it whole."""
    get = data_cfg.get if hasattr(data_cfg, "get") else lambda key, default=None: default
    resolution = get("resolution")
    source = _cached_source(data_cfg.name, split, data_cfg.data_dir, resolution)
    ratio = float(get("imbalance", 0.0) or 0.0)
    if source.num_examples > max_in_memory:
        if ratio not in (0.0, 1.0):
            raise ValueError(
                f"config.data.imbalance={ratio} needs an in-memory dataset; {data_cfg.name} "
                f"has {source.num_examples} examples: set config.data.imbalance=0"
            )
        return source
    arrays = source.to_arrays()
    if ratio in (0.0, 1.0):
        return arrays
    from didistill.data import imbalance

    rows = imbalance.subsample_rows(
        arrays["label"],
        imbalance.geometric_frequencies(source.num_classes, ratio),
        seed=int(get("imbalance_seed", 0)),
    )
    return {k: v[rows] for k, v in arrays.items()}


def image_batches(
    data: Mapping[str, np.ndarray] | ImageSource,
    seed: int,
    batch_size: int,
    start_step: int = 0,
    shard: int = 0,
) -> Iterator[dict[str, Any]]:
    """Endless per-step batches {'image': [B, H, W, C], 'label': [B]}, from `start_step` on.

    Batch `step` holds rows drawn uniformly with replacement by
    `np.random.default_rng([seed, shard, step])`: a function of (seed, shard, step) only, so
    restarting at any `start_step` reproduces the same stream. `shard` (e.g. the process
    index) gives each host its own independent stream.

    Args:
      data: in-memory arrays {'image': [N, ...], 'label': [N]} or an `ImageSource`.
      seed: the run's seed.
      batch_size: B, rows per batch (this process's share of the global batch).
      start_step: index of the first batch.
      shard: stream index, e.g. `jax.process_index()`.
    """
    num_examples = len(data) if isinstance(data, ImageSource) else len(data["image"])
    step = int(start_step)
    while True:
        rng = np.random.default_rng([int(seed), int(shard), step])
        rows = rng.integers(0, num_examples, size=batch_size)  # [B]
        if isinstance(data, ImageSource):
            yield data.get_batch(rows)
        else:
            yield {k: np.asarray(v)[rows] for k, v in data.items()}
        step += 1


__all__ = [
    "ALIASES",
    "DATASETS",
    "DIGITS_NUM_TEST",
    "DatasetNotPreparedError",
    "Digits8x8",
    "ImageSource",
    "digits_split_indices",
    "find_prepared",
    "image_batches",
    "load_images",
    "prepare_digits",
]
