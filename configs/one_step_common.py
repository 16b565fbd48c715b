"""Shared pieces of every one-step distillation config (toy2d, digits, CIFAR-10, ImageNet-64).

`parse(arg)` reads 'method,divergence,flag,...' (any order, all optional); `distill_block`
is the `config.distill` block read by `didistill.distill.one_step.method` with its defaults;
`optimizers` sets the three optimizer blocks (generator, fake score, discriminator).
"""

import ml_collections

from configs import base
from didistill import divergences

METHODS = ("f_distill", "dmd2", "diff_instruct", "sid", "uni_instruct")
GAN_METHODS = ("f_distill", "dmd2", "uni_instruct")


def parse(arg, flags_allowed, default_divergence="jensen_shannon", name="one_step"):
    """'method,divergence,flag,...' -> (method, divergence, flags)."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    method, divergence, flags = "f_distill", None, set()
    for token in tokens:
        if token in METHODS:
            method = token
        elif token in divergences.names():
            divergence = token
        elif token in flags_allowed:
            flags.add(token)
        else:
            raise ValueError(
                f"{name} config arg token {token!r} is not a method {METHODS}, a divergence "
                f"{divergences.names()} or a flag {tuple(flags_allowed)}"
            )
    if divergence is None:
        divergence = default_divergence if method in ("f_distill", "uni_instruct") else "reverse_kl"
    return method, divergence, flags


def distill_block(method, divergence, critic_steps, gan_weight, **overrides):
    """`config.distill`: the method's hyperparameters (`didistill/distill/one_step/method.py`)."""
    block = dict(
        divergence=divergence,
        divergence_params=ml_collections.ConfigDict(),
        critic_steps=critic_steps,  # fake-score and discriminator updates per generator update
        gan_weight=gan_weight if method in GAN_METHODS else 0.0,
        ratio="discriminator",
        ratio_lower=0.1,  # FastGen clips r to [0.1, 20]
        ratio_upper=20.0,
        bin_normalize=True,  # f-distill's time-binned ratio normalisation
        num_bins=10,
        ratio_ema_rate=0.0,
        normalize_weights=True,  # h divided by its batch mean
        time_weight="none" if method == "diff_instruct" else "dmd",
        alpha={"sid": 1.2, "uni_instruct": 1.0}.get(method, 1.0),
        num_sigmas=1000,
        sigma_min=0.002,
        sigma_max=80.0,
        min_index=20,  # DMD2: indices [20, 980) of a 1000-point Karras grid
        max_index=980,
    )
    block.update(overrides)
    return ml_collections.ConfigDict(block)


def optimizers(config, learning_rate, **kwargs):
    """The same optimizer block for the generator, the fake score and the discriminator."""
    for name in ("optim_generator", "optim_fake_score", "optim_discriminator"):
        config[name] = base.optimizer(learning_rate=learning_rate, **kwargs)
    return config
