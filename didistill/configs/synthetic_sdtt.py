"""Step-halving (SDTT) distillation on a synthetic language (distill/discrete/step_halving.py).

    --config=synthetic_sdtt:markov --config.teacher.checkpoint=DIR/teacher_params.msgpack
    --config=synthetic_sdtt:markov,smoke       tiny run, for tests

The teacher comes from configs/synthetic_mdlm.py on the same language and length. Rounds:
round k trains a student of teacher_steps / 2^(k+1) steps against a teacher of
teacher_steps / 2^k steps (64 -> 32 -> 16 -> 8 with the defaults); the teacher of round k is the
student at the end of round k - 1. `distill.divergence` is any name of
`didistill.divergences.categorical.categorical_names()`; its parameters go in
`distill.divergence_params` (alpha for 'alpha', 'skew_kl', 'skew_reverse_kl', 'alpha_beta';
beta for 'generalized_jsd', 'alpha_beta'), e.g. --config.distill.divergence_params.alpha=0.5.
"""

import ml_collections
from ml_collections import config_dict

from didistill.configs import base


def get_config(arg=None):
    name, flags = base.language_arg(arg, "synthetic_sdtt")
    smoke = "smoke" in flags
    config = base.get_config()
    config.method = "step_halving"
    config.teacher = ml_collections.ConfigDict(dict(checkpoint=""))  # teacher_params.msgpack
    config.data = base.text_data(name, 64)  # kind='tfds' for real text (docs/text_scale.md)
    config.distill = ml_collections.ConfigDict(
        dict(
            divergence="reverse_kl",  # SDTT's default 'kl-bwd' = KL(student || target)
            divergence_params=ml_collections.ConfigDict(
                dict(alpha=config_dict.placeholder(float), beta=config_dict.placeholder(float))
            ),
            teacher_steps=64,  # sampling steps of the round-0 teacher
            rounds=3,  # student steps 32, 16, 8
            steps_per_round=500,  # optimizer steps per round
            target="sdtt",  # 'sdtt' | 'onehot' | 'step_marginal' (module docstring)
            time_sampling="antithetic",  # SDTT's continuous times | 'grid' | 'uniform'
            teacher_from="student",  # next round's teacher: 'student' | 'ema' (as SDTT's EMA)
            reset_optimizer=False,  # re-initialise the optimizer at each new round
        )
    )
    config.optim_student = base.optimizer(
        name="adamw", learning_rate=1e-4, warmup_steps=100, grad_clip_norm=1.0
    )
    config.ema_decay = 0.995
    config.eval = base.text_eval()
    config.train.num_steps = 1500  # rounds * steps_per_round
    config.train.batch_size = 64
    config.train.log_every = 50
    config.train.checkpoint_every = 500

    if smoke:
        config.data.length = 16
        config.distill.update(teacher_steps=8, rounds=2, steps_per_round=2)
        config.optim_student.update(learning_rate=1e-3, warmup_steps=0)
        config.ema_decay = 0.9
        config.eval.update(num_samples=32, batch_size=32, sample_steps=(2, 4))
        config.train.num_steps = 4
        config.train.batch_size = 8
        config.train.log_every = 2
        config.train.checkpoint_every = 2
    return config
