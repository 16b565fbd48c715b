"""One-step distillation of the 8x8 digits EDM teacher (didistill/distill/one_step_images.py).

    --config=configs/digits_distill.py:jensen_shannon     f-distill with a registered divergence
    --config=configs/digits_distill.py:dmd2               a named method (dmd2, diff_instruct,
                                                          sid, uni_instruct), or with a
                                                          divergence: uni_instruct,forward_kl
    --config=configs/digits_distill.py:forward_kl,scratch generator initialised from scratch
    --config=configs/digits_distill.py:dmd2,smoke         tiny run for tests

The teacher is `assets/digits/teacher.msgpack`, trained by `configs/digits_teacher.py` (see
assets/README.md). The digits are prepared offline into `config.data.data_dir` on first use.
`image_distill_config` is the shared layout of the image configs (CIFAR-10 and ImageNet-64
configs start from it and set the published hyperparameters).
"""

import ml_collections

from configs import base
from didistill import divergences

METHODS = ("f_distill", "dmd2", "diff_instruct", "sid", "uni_instruct")
FLAGS = ("smoke", "scratch")
_GAN_METHODS = ("f_distill", "dmd2", "uni_instruct")


def parse(arg, default_divergence="jensen_shannon", name="digits_distill"):
    """'method,divergence,flag,...' -> (method, divergence, flags); any order, all optional."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    method, divergence, flags = "f_distill", None, set()
    for token in tokens:
        if token in METHODS:
            method = token
        elif token in divergences.names():
            divergence = token
        elif token in FLAGS:
            flags.add(token)
        else:
            raise ValueError(
                f"{name} config arg token {token!r} is not a method {METHODS}, a divergence "
                f"{divergences.names()} or a flag {FLAGS}"
            )
    if divergence is None:
        divergence = default_divergence if method in ("f_distill", "uni_instruct") else "reverse_kl"
    return method, divergence, flags


def image_distill_config(method, divergence, flags):
    """Every key of an image distillation config, with digits-sized defaults."""
    config = base.get_config()
    config.method = method
    config.data = ml_collections.ConfigDict(
        dict(kind="images", name="digits", data_dir="data/tfds", resolution=None)
    )
    config.teacher = ml_collections.ConfigDict(
        dict(checkpoint="assets/digits/teacher.msgpack", score="network")
    )
    sid_like = method in ("sid", "uni_instruct")
    config.generator = ml_collections.ConfigDict(
        dict(kind="unet", init="scratch" if "scratch" in flags else "teacher")
    )
    # z ~ N(0, sigma_g^2 I) at sigma_g: 80 = sigma_max (DMD2, FastGen), 2.5 (SiD, Uni-Instruct).
    config.generator.sigma = 2.5 if sid_like else 80.0
    config.discriminator = ml_collections.ConfigDict(
        dict(resolutions=(8, 4), width=64, num_layers=2)  # a ConvHead on teacher features
    )
    config.distill = ml_collections.ConfigDict(
        dict(
            divergence=divergence,
            divergence_params=ml_collections.ConfigDict(),
            critic_steps=5,  # fake-score (and discriminator) updates per generator update
            gan_weight=1e-3 if method in _GAN_METHODS else 0.0,
            ratio="discriminator",
            ratio_lower=0.1,
            ratio_upper=20.0,
            bin_normalize=True,
            num_bins=10,
            ratio_ema_rate=0.0,
            normalize_weights=True,
            time_weight="none" if method == "diff_instruct" else "dmd",
            alpha={"sid": 1.2, "uni_instruct": 1.0}.get(method, 1.0),
            num_sigmas=1000,
            sigma_min=0.002,
            sigma_max=80.0,
            min_index=20,  # DMD2: indices [20, 980) of a 1000-point Karras grid
            max_index=980,
        )
    )
    lr = 1e-4
    config.optim_generator = base.optimizer(learning_rate=lr, b1=0.0, b2=0.99)
    config.optim_fake_score = base.optimizer(learning_rate=lr, b1=0.0, b2=0.99)
    config.optim_discriminator = base.optimizer(learning_rate=lr, b1=0.0, b2=0.99)
    config.ema_decay = 0.999
    config.eval = ml_collections.ConfigDict(
        dict(
            num_samples=500,
            batch_size=500,
            teacher_nfe=35,
            feature_checkpoint="assets/digits/classifier_teacher.msgpack",  # digits FID if present
        )
    )
    config.train.num_steps = 2000
    config.train.batch_size = 128
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    return config


def shrink_for_smoke(config):
    """Two-step-sized settings for tests (the networks' size comes from the teacher file)."""
    config.train.num_steps = 2
    config.train.batch_size = 4
    config.train.log_every = 1
    config.train.checkpoint_every = 0
    config.train.progress = False
    config.distill.critic_steps = 1
    config.discriminator.width = 8
    config.discriminator.num_layers = 1
    config.eval.num_samples = 8
    config.eval.batch_size = 8
    config.eval.teacher_nfe = 3
    config.eval.feature_checkpoint = ""
    return config


def get_config(arg=None):
    method, divergence, flags = parse(arg)
    config = image_distill_config(method, divergence, flags)
    if "smoke" in flags:
        shrink_for_smoke(config)
    return config
