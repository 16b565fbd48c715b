"""Shared pieces of every one-step distillation config (toy2d, digits, CIFAR-10, ImageNet-64).

The method names and their defaults come from the one table `didistill.distill.one_step.table`.
`parse(arg)` reads 'method,divergence,flag,...' (any order, all optional); `distill_block`
is the `config.distill` block read by `didistill.distill.one_step.method` with its defaults;
`optimizers` sets the three optimizer blocks (generator, fake score, discriminator).
"""

import os

import ml_collections

from didistill import assets, divergences
from didistill.configs import base
from didistill.distill.one_step import table

METHODS = tuple(table.METHODS)


def parse(arg, flags_allowed, default_divergence="jensen_shannon", name="one_step"):
    """'method,divergence,flag,...' -> (method, divergence, flags); any order, all optional.
    The divergence defaults to `default_divergence` for a method that takes any, else to the
    method's own (`one_step.table`)."""
    slots = {"method": METHODS, "divergence": divergences.names()}
    values, flags = base.parse_arg(arg, name, slots, flags_allowed, {"method": "f_distill"})
    method, divergence = values["method"], values["divergence"]
    if divergence is None:
        divergence = table.METHODS[method].divergence or default_divergence
    return method, divergence, flags


def distill_block(method, divergence, critic_steps, gan_weight, **overrides):
    """`config.distill`: the method's hyperparameters (`didistill/distill/one_step/method.py`),
    with the method's defaults from its row of `one_step.table`."""
    spec = table.METHODS[method]
    block = dict(
        divergence=divergence,
        divergence_params=ml_collections.ConfigDict(),
        critic_steps=critic_steps,  # fake-score and discriminator updates per generator update
        gan_weight=gan_weight if spec.gan else 0.0,
        ratio="discriminator",
        ratio_lower=0.1,  # FastGen clips r to [0.1, 20]
        ratio_upper=20.0,
        bin_normalize=True,  # f-distill's time-binned ratio normalisation
        num_bins=10,
        ratio_ema_rate=0.0,
        normalize_weights=True,  # h divided by its batch mean
        time_weight=spec.time_weight,
        alpha=spec.alpha,
        num_sigmas=1000,
        sigma_min=0.002,
        sigma_max=80.0,
        # generator noise (one_step.noise): FastGen / DMD2 'karras_index', SiD 'sid', DI 'lognormal'
        noise=spec.noise,
        min_index=20,  # DMD2: indices [20, 980] (inclusive) of the ascending 1000-point grid
        max_index=980,
        tmax=800,  # SiD / Uni-Instruct: u ~ U[0, tmax / 1000), sigma <= about 24.4
        p_mean=-1.2,  # lognormal noise (EDM, SiD and Diff-Instruct fake score)
        p_std=1.2,
        fake_score_noise=spec.fake_score_noise,  # 'same': the generator's sampler
        fake_score_weight=spec.fake_score_weight,  # 'none' (FastGen), 'karras' (DMD2), 'edm'
        gan_r1_weight=0.0,  # FastGen's approximate R1 (off by default there too)
        gan_r1_alpha=0.1,
        ema_halflife_images=0.0,  # > 0: SiD's EMA (half-life in images) instead of ema_decay
        ema_rampup_ratio=0.0,  # SiD: 0.05
        # Uni-Instruct's recipe (fsim_training_loop.py); 0 / 'none' = off elsewhere
        di_term="none",  # 'derived': add our Diff-Instruct term (losses.uni_instruct_...)
        gan_time_weight=spec.gan_time_weight,  # 'dmd': GAN term times mean(1/mean|x0 - D_phi|)
        gan_recipe=spec.gan_recipe,  # 'fastgen' or 'sida' (one_step.table)
        gan_warmup_images=0,  # before: reverse KL (h = 1) and no generator GAN term (UI: 200k)
        generator_freeze_images=0,  # before: the generator is not updated (UI: 100k)
        critic_grad_clip=0.0,  # > 0: critic gradients nan_to_num'ed and clipped by value (UI: 1)
    )
    block.update(spec.extra)  # the method's own keys (VDOT's OT settings)
    block.update(overrides)
    return ml_collections.ConfigDict(block)


def discriminator_features(method):
    """Whose encoder the discriminator head reads: the fake score's for SiDA's GAN recipe
    (Uni-Instruct), else the frozen teacher's (f-distill, DMD2)."""
    return "fake_score" if table.METHODS[method].gan_recipe == "sida" else "teacher"


def fastgen_schedule(config, iterations, beta=0.9999, update_freq=5):
    """FastGen counts iterations: 1 generator + (update_freq - 1) critic updates per update_freq
    iterations, EMA `beta` every iteration. Here a step is one generator update, so:
    critic_steps = update_freq - 1, num_steps = iterations / update_freq and
    ema_decay = beta^update_freq (exact: the generator only moves at its own updates)."""
    config.distill.critic_steps = update_freq - 1
    config.train.num_steps = iterations // update_freq
    config.ema_decay = beta**update_freq
    return config


def sid_ema(config, halflife_images, rampup_ratio=0.05):
    """SiD's EMA: half-life in images with ramp-up; ema_decay keeps the ramp's end value."""
    config.distill.ema_halflife_images = float(halflife_images)
    config.distill.ema_rampup_ratio = rampup_ratio
    config.ema_decay = 0.5 ** (config.train.batch_size / halflife_images)
    return config


def optimizers(config, learning_rate, **kwargs):
    """The same optimizer block for the generator, the fake score and the discriminator."""
    for name in ("optim_generator", "optim_fake_score", "optim_discriminator"):
        config[name] = base.optimizer(learning_rate=learning_rate, **kwargs)
    return config


IMAGE_FLAGS = ("smoke", "scratch")


def image_distill_config(method, divergence, flags):
    """Every key of an image distillation config, with digits-sized defaults."""
    config = base.get_config()
    config.method = method
    config.data = ml_collections.ConfigDict(
        dict(
            kind="images",
            name="digits",
            data_dir="data/tfds",
            resolution=None,
            imbalance=0.0,  # > 1: geometric class frequencies, max/min ratio (data/imbalance.py)
            imbalance_seed=0,
        )
    )
    config.teacher = ml_collections.ConfigDict(
        dict(checkpoint=assets.path("digits/teacher.msgpack"), score="network")
    )
    config.generator = ml_collections.ConfigDict(
        dict(
            kind="unet",
            init="scratch" if "scratch" in flags else "teacher",
            num_steps=table.METHODS[method].num_steps,  # K > 1: a K-step student (few_step.py)
        )
    )
    # z ~ N(0, sigma_g^2 I) at sigma_g: 80 = sigma_max (DMD2, FastGen), 2.5 (SiD, Uni-Instruct).
    config.generator.sigma = table.METHODS[method].sigma_g
    config.discriminator = ml_collections.ConfigDict(
        # FastGen's per-resolution logit heads on teacher features (width 0: feature channels)
        dict(kind="fastgen", resolutions=(8, 4), width=0, num_layers=2)
    )
    config.discriminator.features = discriminator_features(method)
    config.distill = distill_block(method, divergence, critic_steps=5, gan_weight=1e-3)
    optimizers(config, learning_rate=1e-4, b1=0.0, b2=0.99)
    config.ema_decay = 0.999
    # 'bfloat16': every U-Net computes in bf16, float32 parameters, outputs and losses
    config.model = ml_collections.ConfigDict(dict(compute_dtype="float32"))
    config.eval = ml_collections.ConfigDict(
        dict(
            num_samples=500,
            batch_size=500,
            teacher_nfe=35,
            feature_checkpoint=assets.path(
                "digits/classifier_teacher.msgpack"
            ),  # digits FID if present
            every=0,  # > 0: sample grid (and small-sample FID) every N steps
            periodic_samples=5000,  # samples of the periodic FID
            grid_samples=64,
            fid=fid_block(inception="", reference=""),  # Inception FID (off for digits)
        )
    )
    config.train.num_steps = 2000
    config.train.batch_size = 128
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    return config


def fid_block(inception: str | None = None, reference: str | None = None, num_samples=50_000):
    """`config.eval.fid` (didistill.eval.generator_fid): FID Inception weights and reference
    statistics (default: where `python -m didistill.prepare inception` / `fid-refs NAME`
    put them), N samples per seed set, seed sets, global sampling batch."""
    from didistill import prepare

    data_dir = prepare.default_data_dir()
    if inception is None:
        inception = os.path.join(data_dir, prepare.ARTEFACTS["inception"].output)
    if reference in prepare.FID_REFS:  # 'cifar10' -> its cache path
        reference = os.path.join(data_dir, prepare.ARTEFACTS[f"fid-refs-{reference}"].download)
    return ml_collections.ConfigDict(
        dict(
            inception=inception,
            reference=reference,
            num_samples=num_samples,
            seeds=1,
            batch_size=250,
        )
    )


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
    config.eval.fid.inception = ""
    config.eval.fid.num_samples = 8
    config.eval.fid.batch_size = 8
    config.eval.periodic_samples = 8
    config.eval.grid_samples = 8
    return config
