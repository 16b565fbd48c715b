"""Inception FID of a one-step image generator: sharded sampling, float64 statistics, protocol.

`config.eval.fid` (read by `FIDSettings.from_config`):

    inception    the FID Inception weights (`.npz` of `python -m didistill.prepare inception`),
                 or a classifier network file (`nets.files`, arch 'classifier': its
                 penultimate layer; small feature networks for tests); "" turns the FID off
    reference    reference statistics `.npz` ('mu' [F], 'sigma' [F, F]; EDM's fid-refs or
                 `save_reference`), with the same feature network
    num_samples  N generated images per seed set (50,000 for published tables)
    seeds        S disjoint seed sets: set s uses sample indices s N .. (s + 1) N - 1 (EDM's
                 0-49999, 50000-99999, ...); EDM quotes the min over 3 sets, SiD the mean
    batch_size   global sampling batch (split over every device of every process)

Sample j of a protocol is a function of j alone, not of the batch, mesh or host count:
`k_j = fold_in(key(0), j)`, `z_j = N(0, I)` from `split(k_j)[0]` and, for a class-conditional
generator, the label `y_j ~ U{0..K-1}` from `split(k_j)[1]` (EDM draws each seed's label from
that seed's generator). Images are clipped to [-1, 1] and quantised to 8 bits before the
feature network (EDM saves PNGs); one-channel images are repeated to RGB for Inception.

Sharding. Process p of P draws indices [p N / P, (p + 1) N / P) of a seed set, in batches of
`batch_size / P` split over its local devices (`jit` with `NamedSharding(local mesh,
P('data'))`); per batch the devices return the batch mean and centred scatter (float32, summed
over the local devices by XLA) and the host folds them into a float64 `fid.FeatureStats`
(Chan's update). Then every process's (count, mean, M2) is gathered in float64 (each float64
array sent as two float32 arrays, hi + lo, exact to ~2^-48 relative) and merged in process
order, so every process holds the same statistics: count = N, mu = sum f / N,
Sigma = (sum f f^T - N mu mu^T) / (N - 1). Hence N must divide by the number of devices and
`batch_size` by the number of devices (`check_divisible`).

`eval.json` / `fid.json` record the protocol: samples, seed sets and their index ranges, the
SHA-256 of the reference and feature files, and min / mean / std over the seed sets.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from didistill.eval import fid
from didistill.train import files
from didistill.train.errors import ConfigError

KEY = "config.eval.fid"
PREPARE_INCEPTION = "python -m didistill.prepare inception"
PREPARE_REFS = "python -m didistill.prepare fid-refs cifar10|imagenet64"


@dataclasses.dataclass(frozen=True)
class FIDSettings:
    inception: str
    reference: str
    num_samples: int = 50_000
    seeds: int = 1
    batch_size: int = 250

    @classmethod
    def from_config(cls, eval_cfg) -> FIDSettings | None:
        """The settings of `config.eval.fid`, or None when it is absent or `inception` is ''."""
        block = eval_cfg.get("fid") if eval_cfg is not None else None
        if block is None or not block.get("inception", ""):
            return None
        settings = cls(
            inception=str(block.inception),
            reference=str(block.get("reference", "")),
            num_samples=block.get("num_samples", 50_000),
            seeds=block.get("seeds", 1),
            batch_size=block.get("batch_size", 250),
        )
        for key in ("num_samples", "seeds", "batch_size"):
            value = getattr(settings, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{KEY}.{key}={value!r} is invalid: give a positive integer")
        if not settings.reference:
            raise ConfigError(
                f"{KEY}.reference is empty: name the reference statistics .npz ({PREPARE_REFS})"
            )
        return settings

    def replace(self, **changes) -> FIDSettings:
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)


def check_divisible(num_samples: int, batch_size: int, num_devices: int | None = None) -> None:
    """ConfigError unless samples and batch split evenly over the devices (of all processes)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    for key, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if value % num_devices:
            lower = value - value % num_devices
            raise ConfigError(
                f"{KEY}.{key}={value} does not split over the {num_devices} devices: use a "
                f"multiple of {num_devices} (e.g. {max(lower, num_devices)})"
            )


def check_files(settings: FIDSettings, image_shape) -> None:
    """Before any training: the feature network loads and the reference fits the images."""
    with jax.set_mesh(local_mesh()):  # as in evaluate_fid: the loaded network is cached
        _, info = load_feature_network(settings.inception, image_shape)
    load_reference(settings.reference, int(image_shape[0]), info["features"])


# ----------------------------------------------------------------------------- feature network


def _is_inception_npz(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"  # a zip (npz); network files are msgpack


def load_feature_network(path: str, image_shape) -> tuple[Callable, dict[str, Any]]:
    """(features: images [B, H, W, C] in [-1, 1] -> [B, F] (jitted), info) of `path`.

    An Inception `.npz` (pool3, F = 2048; grey images repeated to RGB) or a classifier network
    file (its penultimate layer). Inputs are clipped and quantised to 8 bits in both cases.
    ConfigError naming `config.eval.fid.inception` for a missing or unreadable file.
    """
    if not os.path.isfile(path):
        raise ConfigError(
            f"{KEY}.inception={path!r}: no such file. Fetch and convert the FID Inception with "
            f"`{PREPARE_INCEPTION}` (it prints the path) and pass "
            f"--config.eval.fid.inception=PATH, or set it to '' to skip the FID."
        )
    stat = os.stat(path)
    return _load_feature_network(os.path.abspath(path), tuple(image_shape), stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)  # the same jitted function again: no recompilation
def _load_feature_network(path: str, image_shape, _mtime_ns: int):
    info = {"file": path, "sha256": files.sha256_file(path)}
    if _is_inception_npz(path):
        from didistill.nets import inception

        try:
            variables = inception.load_inception_params(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{KEY}.inception: {err}") from None
        inner = inception.inception_feature_fn(variables)

        def features(images):  # [B, H, W, C] -> [B, 2048]
            if images.shape[-1] == 1:  # EDM: grey images repeated to three channels
                images = jnp.repeat(images, 3, axis=-1)
            return inner(images)

        return features, dict(info, kind="inception_v3_pool3", features=inception.FEATURE_DIM)
    from didistill.nets.files import load_model

    try:
        module, params, meta = load_model(
            path, "classifier", "FID feature network", f"Use `{PREPARE_INCEPTION}`."
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"{KEY}.inception: {err}") from None

    @jax.jit
    def features(images):  # [B, H, W, C] -> [B, F]
        x = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
        x = jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
        return module.apply(params, x, features=True)[1]

    width = jax.eval_shape(features, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return features, dict(info, kind="classifier_penultimate", features=int(width.shape[-1]))


# ----------------------------------------------------------------------------- references


def _resolution_of(path: str, stored) -> int | None:
    if stored is not None:
        return int(stored)
    match = re.search(r"(\d+)x(\d+)", os.path.basename(path))  # EDM: cifar10-32x32.npz
    return int(match.group(1)) if match and match.group(1) == match.group(2) else None


def load_reference(path: str, resolution: int, num_features: int) -> tuple[np.ndarray, ...]:
    """(mu, sigma, info) of a reference file, checked against the images and the features.

    The reference's resolution is its 'resolution' entry (written by `save_reference`) or the
    'RxR' in its file name (EDM's names); a mismatch with the generator's images, or a feature
    width other than the feature network's, is a ConfigError naming the file.
    """
    if not os.path.isfile(path):
        raise ConfigError(
            f"{KEY}.reference={path!r}: no such file. Fetch EDM's statistics with "
            f"`{PREPARE_REFS}` (it prints the path), or write your own with "
            "didistill.eval.generator_fid.save_reference, and pass --config.eval.fid.reference"
        )
    try:
        mu, sigma = fid.load_stats(path)
        with np.load(path, allow_pickle=False) as data:
            stored = data["resolution"] if "resolution" in data.files else None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{KEY}.reference: {err}") from None
    ref_res = _resolution_of(path, stored)
    if ref_res is not None and ref_res != resolution:
        raise ConfigError(
            f"{KEY}.reference={path!r} holds statistics of {ref_res}x{ref_res} images, but the "
            f"generator makes {resolution}x{resolution}: use the reference of this dataset "
            f"({PREPARE_REFS})"
        )
    if mu.shape[0] != num_features:
        raise ConfigError(
            f"{KEY}.reference={path!r} has {mu.shape[0]} features, the feature network "
            f"{KEY}.inception gives {num_features}: both must come from the same network"
        )
    info = {"file": os.path.abspath(path), "sha256": files.sha256_file(path), "resolution": ref_res}
    return mu, sigma, info


def save_reference(path: str, stats: fid.FeatureStats, resolution: int) -> str:
    """Writes reference statistics (EDM's 'mu', 'sigma' plus 'resolution' and 'count')."""
    mu, sigma = stats.mean_cov()
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, resolution=np.int64(resolution), count=stats.count)
    return path


# ----------------------------------------------------------------------------- sampling


def sample_inputs(indices, image_shape, num_classes: int, seed: int = 0):
    """(z [B, H, W, C], labels [B] or None) of sample indices [B]: from
    `fold_in(key(seed), j)` (seed 0 in the FID protocol; see the module docstring)."""

    def one(j):
        k_z, k_y = jax.random.split(jax.random.fold_in(jax.random.key(seed), j))
        z = jax.random.normal(k_z, image_shape)
        y = jax.random.randint(k_y, (), 0, max(num_classes, 1))
        return z, y

    z, y = jax.vmap(one)(indices)
    return z, (y if num_classes else None)


def local_mesh() -> Mesh:
    """A 1-D mesh ('data', Auto) over this process's devices."""
    return Mesh(np.asarray(jax.local_devices()), ("data",), axis_types=(AxisType.Auto,))


@functools.lru_cache(maxsize=8)
def _moments_fn(sample_fn, feature_fn, image_shape, num_classes, mesh):
    batch = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())

    def moments(params, indices):  # indices [B] -> (mean [F], centred scatter [F, F])
        z, labels = sample_inputs(indices, image_shape, num_classes)
        images = sample_fn(params, z, labels)  # [B, H, W, C]
        f = feature_fn(images).astype(jnp.float32)  # [B, F]
        mean = jnp.mean(f, axis=0)
        centred = f - mean
        return mean, jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)

    return jax.jit(moments, in_shardings=(rep, batch), out_shardings=(rep, rep))


def host_stats(
    sample_fn, params, feature_fn, image_shape, num_classes, start, stop, batch_size
) -> fid.FeatureStats:
    """Statistics of sample indices [start, stop) drawn on this process's devices only."""
    mesh = local_mesh()
    moments = _moments_fn(sample_fn, feature_fn, tuple(image_shape), num_classes, mesh)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    stats = fid.FeatureStats()
    with jax.set_mesh(mesh):  # whatever mesh the caller has set (the engine's, Explicit axes)
        for s in range(start, stop, batch_size):
            idx = np.arange(s, min(s + batch_size, stop), dtype=np.int32)
            mean, m2 = moments(params, jax.device_put(idx, NamedSharding(mesh, P("data"))))
            stats.update_moments(len(idx), np.asarray(mean, np.float64), np.asarray(m2, np.float64))
    return stats


def _split64(x: np.ndarray) -> np.ndarray:  # float64 [...] -> float32 [2, ...], hi + lo = x
    hi = x.astype(np.float32)
    return np.stack([hi, (x - hi.astype(np.float64)).astype(np.float32)])


def merge_over_processes(stats: fid.FeatureStats, gather=None) -> fid.FeatureStats:
    """Every process's (count, mean, M2) gathered in float64 and merged in process order.

    `gather(array) -> [P, ...]` defaults to `multihost_utils.process_allgather` (tests pass
    their own to simulate several hosts). With one process this returns `stats` itself.
    """
    if gather is None:
        if jax.process_count() == 1:
            return stats
        from jax.experimental import multihost_utils

        gather = lambda x: np.asarray(multihost_utils.process_allgather(x))  # noqa: E731
    counts = np.asarray(gather(np.asarray([stats.count], np.int32)))[:, 0]
    means = np.asarray(gather(_split64(stats.mean)), np.float64)  # [P, 2, F]
    m2s = np.asarray(gather(_split64(stats.m2)), np.float64)  # [P, 2, F, F]
    merged = fid.FeatureStats()
    for count, mean, m2 in zip(counts, means, m2s, strict=True):
        merged.update_moments(int(count), mean[0] + mean[1], m2[0] + m2[1])
    return merged


def generator_stats(
    sample_fn, params, feature_fn, image_shape, num_classes, first, num_samples, batch_size
) -> fid.FeatureStats:
    """Statistics of sample indices [first, first + N), sharded over devices and processes."""
    procs, rank = jax.process_count(), jax.process_index()
    share = num_samples // procs
    start = first + rank * share
    stats = host_stats(
        sample_fn,
        params,
        feature_fn,
        image_shape,
        num_classes,
        start,
        start + share,
        batch_size // procs,
    )
    return merge_over_processes(stats)


def evaluate_fid(
    sample_fn, params, settings: FIDSettings, image_shape, num_classes: int
) -> dict[str, Any]:
    """FID per seed set, min / mean / std over them, and the protocol, as a JSON-able dict.

    `sample_fn(params, z [B, H, W, C], labels [B] or None) -> images [B, H, W, C]` in [-1, 1]
    (a pure function, jitted here with the feature network).
    """
    check_divisible(settings.num_samples, settings.batch_size)
    with jax.set_mesh(local_mesh()):  # not the caller's mesh: arrays made here live on this one
        return _evaluate_fid(sample_fn, params, settings, image_shape, num_classes)


def _evaluate_fid(sample_fn, params, settings, image_shape, num_classes):
    feature_fn, feature_info = load_feature_network(settings.inception, image_shape)
    mu, sigma, ref_info = load_reference(
        settings.reference, int(image_shape[0]), feature_info["features"]
    )
    n = settings.num_samples
    fids = []
    for s in range(settings.seeds):
        stats = generator_stats(
            sample_fn, params, feature_fn, image_shape, num_classes, s * n, n, settings.batch_size
        )
        fids.append(fid.fid_from_stats(stats, (mu, sigma)))
    summary = fid.summarize_over_seeds(fids)
    return {
        "fid": summary["min"] if settings.seeds > 1 else fids[0],
        "fid_min": summary["min"],
        "fid_mean": summary["mean"],
        "fid_std": summary["std"],
        "fid_per_seed_set": fids,
        "fid_protocol": {
            "num_samples": n,
            "seed_sets": settings.seeds,
            "sample_indices": [[s * n, (s + 1) * n - 1] for s in range(settings.seeds)],
            "sample_key": "fold_in(jax.random.key(0), index)",
            "quantized_uint8": True,
            "class_labels": "uniform per sample" if num_classes else "none",
            "feature_network": feature_info,
            "reference": ref_info,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "note": "fid = min over seed sets (EDM); fid_mean = mean (SiD)",
        },
    }


__all__ = [
    "FIDSettings",
    "check_divisible",
    "check_files",
    "evaluate_fid",
    "generator_stats",
    "host_stats",
    "load_feature_network",
    "load_reference",
    "merge_over_processes",
    "sample_inputs",
    "save_reference",
]
