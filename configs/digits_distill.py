"""One-step distillation of the 8x8 digits EDM teacher (didistill/distill/one_step/images.py).

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

from configs import base, one_step_common

METHODS = one_step_common.METHODS
FLAGS = ("smoke", "scratch")


def parse(arg, default_divergence="jensen_shannon", name="digits_distill"):
    """'method,divergence,flag,...' -> (method, divergence, flags); any order, all optional."""
    return one_step_common.parse(arg, FLAGS, default_divergence, name)


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
    config.distill = one_step_common.distill_block(
        method, divergence, critic_steps=5, gan_weight=1e-3
    )
    one_step_common.optimizers(config, learning_rate=1e-4, b1=0.0, b2=0.99)
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
