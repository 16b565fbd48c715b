"""DiDi-Instruct on OpenWebText from the converted MDLM teacher, the reference's settings.

    --config=owt_didi --config.teacher.checkpoint=RUN/teacher_params.msgpack \
        --config.data.tfds_data_dir=TFDS --config.data.tokenizer_dir=GPT2 \
        --config.eval.judge_dir=GPT2

The teacher: `python -m didistill.nets.convert_mdlm DIR/model.safetensors
RUN/teacher_params.msgpack` (kuleshov-group/mdlm-owt). Data, tokenizer and judge files as in
configs/owt_mdlm.py. For GPU/TPU. Values and their sources (haoyangzheng-ai/didi-instruct:
`configs/algo/didi_instruct.yaml` @ 80ac6c1 and @ 7825a02, `configs/config.yaml`, the
training-code `algo.py`; the Hugging Face model card of `haoyangzheng/didi-instruct-small`):
4 samples per group, tau ~ Beta(1, 1) ('beta11', the latest yaml) clamped to [0.02, 0.98],
discriminator = teacher with the last 4 blocks trainable and the spectral-norm head, label
smoothing 0.1, discriminator LR 1e-5, student LR 3e-4 (`optim.lr` of config.yaml), both with
1,000 warm-up steps then linear decay, AdamW without weight decay, gradient clip 1.0
(discriminator) and 0.5 (student), KL coefficients 0.01 per step, entropy bonus 5e-4, reward
clip 8, advantage clip 3, EMA 0.999, 10,000 iterations (model card); 128 data rows x 4
samples per step (config.yaml's global batch 128, repeated G times). Guided sampling with the
released defaults (guidance 30 -> 40, 4 candidates). Not stated by the reference and so left
at this library's defaults: the per-step KL on masked positions of the SUBS laws (the reference
keeps the [MASK] column at log 1e-10), one critic update per student update.
"""

from didistill.configs import base, synthetic_didi


def get_config(arg=None):
    base.parse_arg(arg, "owt_didi")  # takes no argument
    config = synthetic_didi.get_config("markov")
    config.data.update(
        kind="tfds", language="", length=1024, tfds_name="huggingface:openwebtext",
        tfds_split="train[:-100000]", heldout_split="train[-100000:]", tokenizer="gpt2",
        framing="mdlm",
    )  # fmt: skip
    config.distill.update(
        real="data", critic_steps=1, group_size=4, tau_a=1.0, tau_b=1.0, tau_min=0.02,
        tau_max=0.98, disc_trainable_blocks=4, disc_spectral_norm=True,
        disc_head_layernorm=False, label_smoothing=0.1, kl_weight=0.01, entropy_weight=5e-4,
        reward_clip=8.0, advantage_clip=3.0,
    )  # fmt: skip
    config.optim_student.update(learning_rate=3e-4, warmup_steps=1000, grad_clip_norm=0.5)
    config.optim_discriminator.update(learning_rate=1e-5, warmup_steps=1000, grad_clip_norm=1.0)
    config.ema_decay = 0.999
    config.eval.update(
        num_samples=256, batch_size=32, sample_steps=(8, 16, 32, 64, 128),
        judge="didistill.eval.gen_ppl:gpt2_judge",
    )  # fmt: skip
    config.eval.guided.enabled = True
    config.train.update(num_steps=10_000, batch_size=512, log_every=50, checkpoint_every=1000)
    return config
