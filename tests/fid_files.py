"""Tiny FID files the tests write themselves: a random feature network (an MLP classifier file
in the place of the Inception weights, the same `images [-1, 1] -> [B, F]` interface), reference
statistics of random images, and a random one-step generator teacher."""

import jax
import jax.numpy as jnp
import numpy as np

from didistill.eval import fid, generator_fid
from didistill.nets.classifier import make_classifier
from didistill.nets.files import save_model
from tests.teachers import save_tiny_unet_teacher

FEATURES = 6


def save_feature_net(path, shape=(8, 8, 3), width=FEATURES) -> str:
    cfg = dict(kind="mlp", widths=[width], num_classes=3)
    net = make_classifier(cfg)
    params = net.init(jax.random.key(0), jnp.zeros((1, *shape)))
    return save_model(str(path), params, cfg, "classifier")


def save_reference(path, feature_path, shape=(8, 8, 3), resolution=None, n=64) -> str:
    features, _ = generator_fid.load_feature_network(str(feature_path), shape)
    images = np.random.default_rng(1).uniform(-1, 1, (n, *shape)).astype(np.float32)
    stats = fid.FeatureStats().update(np.asarray(features(images)))
    return generator_fid.save_reference(str(path), stats, resolution or shape[0])


def fid_files(directory, shape=(8, 8, 3), label_dim=0):
    """(teacher, feature network, reference) paths in `directory`."""
    teacher = save_tiny_unet_teacher(
        directory / "teacher.msgpack", resolution=shape[0], channels=shape[2], label_dim=label_dim
    )
    features = save_feature_net(directory / "features.msgpack", shape)
    reference = save_reference(directory / "ref.npz", features, shape)
    return teacher, features, reference
