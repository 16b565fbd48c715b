"""MDLM teacher on OpenWebText with the published settings (Sahoo et al. 2024; MDLM repo
`configs/*`, its Hydra configs of the OpenWebText run). For GPU/TPU.

    --config=owt_mdlm          GPT-2 tokenizer, L = 1024, DiT 12 x 768 x 12 heads,
                                          AdamW 3e-4, 2,500 warm-up steps then constant,
                                          grad clip 1.0, batch 512, 1M steps, EMA 0.9999,
                                          log-linear schedule (eps 1e-3), no time conditioning

Needs, prepared offline (see didistill.data.text.TFDS_HOWTO and GPT2Tokenizer.from_dir):
- config.data.tfds_data_dir: a tfds data dir with `huggingface:openwebtext` built as
  array_record (MDLM holds out the last 100k documents as validation: build such a split and
  name it in config.data.heldout_split);
- config.data.tokenizer_dir: GPT-2's vocab.json and merges.txt.
Gen PPL: GPT-2 Large as in MDLM (`didistill.eval.gen_ppl:gpt2_judge`, MDLM's retokenisation,
batches of 8 and EOS weighting), from the files in config.eval.judge_dir (model.safetensors,
config.json, vocab.json, merges.txt of openai-community/gpt2-large); without them gen_ppl is
NaN and a warning says what to download. The published MDLM teacher converts with
`python -m didistill.nets.convert_mdlm DIR/model.safetensors teacher_params.msgpack`.
Memory (docs/scale.md): config.net.attention ('auto': cuDNN flash attention on GPUs),
config.net.remat and config.train.grad_accum_steps (4 here).
MDLM trains in bf16 (config.net.dtype='bfloat16' here) with dropout 0.1.
"""

from didistill.configs import base, synthetic_mdlm


def get_config(arg=None):
    base.parse_arg(arg, "owt_mdlm")  # takes no argument
    config = synthetic_mdlm.get_config("markov")
    config.data.update(
        kind="tfds",
        language="",
        length=1024,
        tfds_name="huggingface:openwebtext",
        tfds_split="train[:-100000]",
        heldout_split="train[-100000:]",
        tokenizer="gpt2",
        framing="mdlm",  # MDLM's wrap: BOS + 1022 tokens + EOS per row
    )
    config.net.update(
        width=768, depth=12, num_heads=12, dropout=0.1, cond_dim=128, dtype="bfloat16",
        attention="auto",  # jax.nn.dot_product_attention: cuDNN flash on GPUs, XLA elsewhere
        remat=False,
    )  # fmt: skip
    config.optim = base.optimizer(
        name="adamw", learning_rate=3e-4, weight_decay=0.0, warmup_steps=2500, grad_clip_norm=1.0
    )
    config.ema_decay = 0.9999
    config.ema_warmup = False
    config.eval.update(
        num_samples=64, batch_size=16, sample_steps=(1024,), heldout_batches=16,
        judge="didistill.eval.gen_ppl:gpt2_judge",
    )  # fmt: skip
    # 4 micro-batches per step: about 39 GiB per device on 8 x 80 GB (computed, docs/scale.md)
    config.train.update(
        num_steps=1_000_000, batch_size=512, grad_accum_steps=4, log_every=100,
        checkpoint_every=10_000,
    )  # fmt: skip
    return config
