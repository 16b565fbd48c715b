"""DiDi-Instruct on a synthetic language (didistill/distill/discrete/didi.py).

    --config=synthetic_didi:markov --config.teacher.checkpoint=DIR/teacher_params.msgpack
    --config=synthetic_didi:markov,smoke       tiny run, for tests
    --config=synthetic_didi:markov_tiny,cpu   minutes on 2 CPU cores from the shipped
                                                          teacher (assets/text, length 32)

The teacher comes from configs/synthetic_mdlm.py on the same language and length. Every
ingredient of the reference's cumulative ablation is a flag in config.distill:
score_decomposition, coupled_time, time_weight ('none' | 'elbo'), importance_weight,
kl_weight / entropy_weight (0 disables), reward_normalize (grouped, G = group_size).
config.eval.guided switches on the reward-guided sampler at evaluation.
"""

import ml_collections

from didistill import assets
from didistill.configs import base

SHIPPED_TEACHER = assets.path(
    "text/markov_tiny_teacher.msgpack"
)  # configs/synthetic_mdlm.py:...,cpu
SHIPPED_LANGUAGE = "markov_tiny"


def get_config(arg=None):
    name, flags = base.language_arg(arg, "synthetic_didi", ("smoke", "cpu"))
    smoke = "smoke" in flags
    config = base.get_config()
    config.method = "didi_instruct"
    config.teacher = ml_collections.ConfigDict(dict(checkpoint=""))  # teacher_params.msgpack
    config.data = base.text_data(name, 64)  # kind='tfds' for real text (docs/text_scale.md)
    config.distill = ml_collections.ConfigDict(
        dict(
            real="data",  # 'data' (corrupted data, the reference) | 'teacher' (its samples)
            teacher_sample_steps=64,  # teacher sampler steps for the real side
            label_smoothing=0.1,
            disc_trainable_blocks=2,  # last K teacher blocks trainable (0: head only)
            disc_spectral_norm=False,  # spectral norm on the head's Dense layers (reference)
            disc_head_layernorm=True,  # LayerNorm before the head (the reference has none)
            critic_steps=1,  # discriminator updates per student update
            group_size=4,  # G student samples per group
            reward_normalize=True,  # grouped z-score of rewards
            reward_clip=8.0,  # per-token logit clip (0: none)
            advantage_clip=3.0,  # clip of normalised advantages (0: none)
            score_decomposition=True,  # two-step trajectory m -> z_tau -> x
            coupled_time=True,  # discriminator/reward corruption at the trajectory's tau
            tau_a=1.0,  # tau ~ Beta(a, b), clamped to [tau_min, tau_max]
            tau_b=1.0,
            tau_min=0.02,
            tau_max=0.999,
            time_weight="elbo",  # omega(t): 'none' | 'elbo' (clamped to [0.1, 10])
            importance_weight=False,  # divide omega by the proposal density pi(t)
            logprob_mode="revealed",  # 'revealed' | 'transition'
            kl_weight=0.01,  # KL(teacher || student) per step (0 disables)
            entropy_weight=5e-4,  # entropy bonus (0 disables)
        )
    )
    # Both: the reference's warm-up then linear decay to train.num_steps (its `_get_lr`).
    config.optim_student = base.optimizer(
        name="adamw", learning_rate=1e-5, warmup_steps=100, grad_clip_norm=0.5,
        schedule="warmup_linear_decay",
    )  # fmt: skip
    config.optim_discriminator = base.optimizer(
        name="adamw", learning_rate=1e-4, warmup_steps=100, grad_clip_norm=1.0,
        schedule="warmup_linear_decay",
    )  # fmt: skip
    config.ema_decay = 0.999
    config.eval = base.text_eval()
    # Reward-guided ancestral sampler (didistill/distill/discrete/guided_sampling.py), reported as
    # student_guided/steps{N}/... next to the plain student. Defaults: the reference's released
    # setting (configs/algo/didi_instruct.yaml @ 7825a02: guidance 30 -> 40, 4 candidates,
    # rerank_steps_ratio 0.5; its first commit had 0.2 -> 1.0).
    config.eval.guided = ml_collections.ConfigDict(
        dict(
            enabled=False,
            guidance_scale=30.0,  # h at the first step (0: no gradient tilting)
            guidance_scale_end=40.0,  # h at the last tilt step (linear ramp)
            tilt_until=0.5,  # the first int(N (1 - tilt_until)) steps tilt, the rest re-rank
            best_of=4,  # candidates per re-ranking step (1: none)
            grad_clip=1.0,  # clamp of the tilt gradient (0: none)
            tilt_input="prediction",  # 'prediction' (reference) | 'state' (one-hot z_t)
            rerank_temperature=1.0,  # > 0: sample softmax(log r / T) (reference T = 1); 0: argmax
            rerank_positions="all",  # candidates scored over 'all' L positions | 'masked'
            final_eps=1e-5,  # grid 1 -> eps, then a final denoising step (0: grid to 0)
            aggregate="sum",  # log r from the token logits: 'sum' (reference) | 'mean'
        )
    )
    config.train.num_steps = 2000
    config.train.batch_size = 64
    config.train.log_every = 50
    config.train.checkpoint_every = 500

    if "cpu" in flags:
        # Short CPU runs from the shipped teacher (assets/text): a 10x faster student and a
        # discriminator that learns within the run (at 1e-4 and one critic update its loss
        # stayed at log 2 for 200 steps, so the reward was noise); EMA short enough to move.
        if name == SHIPPED_LANGUAGE:
            config.teacher.checkpoint = SHIPPED_TEACHER
        config.data.length = 32
        # Kept as measured (README): teacher samples as the real side, constant learning rates.
        config.distill.update(real="teacher", teacher_sample_steps=32, critic_steps=2)
        config.optim_student.update(learning_rate=1e-4, warmup_steps=20, schedule="warmup_constant")
        config.optim_discriminator.update(
            learning_rate=1e-3, warmup_steps=0, schedule="warmup_constant"
        )
        config.ema_decay = 0.99
        config.train.num_steps = 200
        config.train.log_every = 20
        config.train.checkpoint_every = 100
    if smoke:
        config.data.length = 16
        config.distill.update(teacher_sample_steps=4, disc_trainable_blocks=1)
        config.optim_student.update(learning_rate=1e-3, warmup_steps=0)
        config.optim_discriminator.warmup_steps = 0
        config.ema_decay = 0.9
        config.eval.update(num_samples=32, batch_size=32, sample_steps=(4, 8))
        config.train.num_steps = 4
        config.train.batch_size = 8
        config.train.log_every = 2
        config.train.checkpoint_every = 2
    return config
