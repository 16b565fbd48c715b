"""Config of the engine tests' dummy method (tests/dummy_method.py): a few seconds on CPU."""

import ml_collections

from didistill.configs import base


def get_config(arg=None):
    del arg
    config = base.get_config()
    config.method = "tests.dummy_method:make_method"
    config.train.num_steps = 12
    config.train.batch_size = 8
    config.train.log_every = 3
    config.train.checkpoint_every = 4
    config.train.keep_checkpoints = 2
    config.train.max_nonfinite_steps = 3
    config.train.progress = False
    config.optimizer = base.optimizer(learning_rate=0.05)
    config.dummy = ml_collections.ConfigDict(
        dict(dim=4, input_noise=0.1, ema_decay=0.9, nan_steps=(), sleep_s=0.0, sigterm_at_step=-1)
    )
    return config
