"""EDM teacher on scikit-learn's 8x8 digits (didistill/distill/teachers/images.py).

    --config=digits_teacher            class-conditional U-Net, 8x8x1
    --config=digits_teacher:uncond     unconditional
    --config=digits_teacher:smoke      tiny network and run, for tests

The digits are prepared offline into `config.data.data_dir` (default 'data/tfds', relative to
the working directory) on first use. The run writes samples.png, eval.json and
teacher.msgpack (a U-Net network file that `configs/digits_distill.py` reads as its
teacher); the shipped `assets/digits/teacher.msgpack` comes from this config (see
assets/README.md for the command and the measured numbers).
"""

import ml_collections

from didistill import assets
from didistill.configs import base

METHOD = "image_teacher"
_FLAGS = ("smoke", "uncond")


def get_config(arg=None):
    _, flags = base.parse_arg(arg, "digits_teacher", flags=_FLAGS)
    config = base.get_config()
    config.method = METHOD
    config.data = ml_collections.ConfigDict(
        dict(name="digits", data_dir="data/tfds", resolution=None, imbalance=0.0, imbalance_seed=0)
    )
    config.net = ml_collections.ConfigDict(
        dict(
            model_channels=32,
            channel_mult=(1, 2),  # 8x8 -> 4x4
            channel_mult_emb=4,
            num_blocks=2,
            attn_resolutions=(),
            dropout=0.0,
            label_dim=0 if "uncond" in flags else 10,
            label_dropout=0.0,
            augment_dim=0,
            sigma_data=0.5,
            img_resolution=8,
            img_channels=1,
        )
    )
    config.edm = ml_collections.ConfigDict(
        dict(p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    )
    config.optim = base.optimizer(learning_rate=1e-3, warmup_steps=100)
    config.ema_decay = 0.999
    config.ema_warmup = True
    config.eval = ml_collections.ConfigDict(
        dict(
            nfe=35,
            num_samples=100,
            feature_checkpoint=assets.path(
                "digits/classifier_teacher.msgpack"
            ),  # digits FID if present
        )
    )
    config.train.num_steps = 1000
    config.train.batch_size = 128
    config.train.log_every = 50
    config.train.checkpoint_every = 1000

    if "smoke" in flags:
        config.net.model_channels = 8
        config.net.channel_mult = (1,)  # one level: cheap to compile
        config.net.num_blocks = 1
        config.net.channel_mult_emb = 2
        config.ema_decay = 0.9
        config.eval.nfe = 5
        config.eval.num_samples = 20
        config.eval.feature_checkpoint = ""
        config.train.num_steps = 4
        config.train.batch_size = 16
        config.train.log_every = 2
        config.train.checkpoint_every = 0
        config.train.progress = False
    return config
