"""MDLM teacher on a synthetic language with exact likelihood (didistill/distill/teachers/mdlm.py).

    --config=synthetic_mdlm:markov          full run (CPU minutes)
    --config=synthetic_mdlm:hmm,smoke       tiny network and run, for tests
    --config=synthetic_mdlm:markov_tiny,cpu   the shipped CPU teacher (assets/text)
    languages: see didistill.data.text.LANGUAGES (markov_tiny, markov_small, markov,
               hmm_small, hmm)

The run writes eval.json (Gen PPL under the exact source + entropy + NFE at several sampler
step counts, held-out NELBO against the exact entropy) and teacher_params.msgpack.
"""

import ml_collections

from didistill.configs import base


def get_config(arg=None):
    name, flags = base.language_arg(arg, "synthetic_mdlm", ("smoke", "cpu"))
    config = base.get_config()
    config.method = "mdlm_teacher"
    config.data = base.text_data(name, 64)
    config.net = ml_collections.ConfigDict(
        dict(
            width=128,
            depth=4,
            num_heads=4,
            mlp_ratio=4,
            dropout=0.0,
            time_conditioning=False,
            cond_dim=64,
            dtype="float32",
        )
    )
    config.diffusion = ml_collections.ConfigDict(
        dict(schedule="loglinear", eps=1e-3, t_min=1e-3, low_discrepancy=True)
    )
    config.optim = base.optimizer(
        name="adamw", learning_rate=1e-3, warmup_steps=200, grad_clip_norm=1.0
    )
    config.ema_decay = 0.999
    config.ema_warmup = True
    config.eval = base.text_eval(
        (8, 32, 128),
        float64=False,  # Gumbel sampling in float64 (x64 mode inside evaluate)
        heldout_batches=4,
        num_t=4,
    )

    config.train.num_steps = 5000
    config.train.batch_size = 128
    config.train.log_every = 100
    config.train.checkpoint_every = 1000

    if "cpu" in flags:  # the shipped assets/text teacher: 5 minutes on 2 CPU cores
        config.data.length = 32
        config.net.update(width=64, depth=2, num_heads=4)
        config.optim.learning_rate = 2e-3
        config.eval.sample_steps = (8, 16, 32, 64)
        config.train.num_steps = 2000
    if "smoke" in flags:
        config.data.length = 16
        config.net.update(width=32, depth=1, num_heads=2)
        config.optim.update(learning_rate=3e-3, warmup_steps=0)
        config.ema_decay = 0.9
        config.eval.update(num_samples=32, batch_size=32, sample_steps=(4, 16), heldout_batches=1)
        config.eval.num_t = 1
        config.train.num_steps = 10
        config.train.batch_size = 32
        config.train.log_every = 5
        config.train.checkpoint_every = 5
    return config
