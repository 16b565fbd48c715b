"""Shared base for every experiment config: engine settings and optimizer blocks.

An experiment's `get_config(arg)` starts from `base.get_config()` and fills in the method,
the data and the networks. Every key a run may set is created here or in the experiment
config, so that `--config.a.b=v` on a misspelled key fails with a "Did you mean" hint.
"""

import ml_collections


def optimizer(
    learning_rate=1e-4,
    name="adam",
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    warmup_steps=0,
    grad_clip_norm=0.0,
    schedule="warmup_constant",
    decay_steps=0,
):
    """One optimizer block, read by `didistill.train.optim.make_optimizer`."""
    return ml_collections.ConfigDict(
        dict(
            name=name,
            learning_rate=learning_rate,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            grad_clip_norm=grad_clip_norm,
            schedule=schedule,
            decay_steps=decay_steps,
        )
    )


def text_data(language: str, length: int = 64) -> ml_collections.ConfigDict:
    """The `config.data` block of the text methods (MDLM teacher, DiDi-Instruct, step halving):
    a synthetic language, or real text with kind='tfds' (didistill.distill.teachers.mdlm
    `data_streams`, docs/text_scale.md)."""
    return ml_collections.ConfigDict(
        dict(
            kind="synthetic",  # 'synthetic' | 'tfds' | 'tokens' (pre-tokenised shards)
            language=language,
            length=length,
            # real text only (kind='tfds'); see configs/owt_mdlm.py
            tfds_name="",
            tfds_data_dir="",
            tfds_split="train",
            heldout_split="validation",
            text_key="text",
            tokenizer="bytes",
            tokenizer_dir="",
            framing="none",  # 'mdlm': BOS + L - 2 tokens + EOS per row (MDLM wrap)
            # kind='tokens': folders written by `python -m didistill.data.token_shards`
            tokens_dir="",
            heldout_tokens_dir="",
        )
    )


def text_eval(sample_steps=(8, 16, 32), **extra) -> ml_collections.ConfigDict:
    """`config.eval` of the text methods: samples drawn at each of `sample_steps`, judged by
    the exact language or, for real text, by `judge` ("package.module:factory", e.g.
    "didistill.eval.gen_ppl:gpt2_judge" with its files in `judge_dir`), `perplexity_batch_size`
    samples per judge batch (MDLM's 8)."""
    block = dict(
        num_samples=512,
        batch_size=256,
        sample_steps=tuple(sample_steps),
        judge_smoothing=1e-4,
        judge="",
        judge_dir="",
        perplexity_batch_size=8,
    )
    return ml_collections.ConfigDict(dict(block, **extra))


def parse_arg(arg, config_name: str, slots=None, flags=(), defaults=None, usage=""):
    """The one parser of `--config=FILE.py:ARG` arguments: ARG is comma-separated tokens in any
    order, each either a value of one named slot (e.g. a method, a divergence, a language) or
    a flag. Returns ({slot: value}, {flags}); a slot not given takes its default (or None).

    Raises ValueError naming the config, the token and the valid tokens (after `usage`, when
    given) for an unknown token, and for two values of one slot (contradictory arguments never
    silently last-win)."""
    slots, defaults = dict(slots or {}), dict(defaults or {})
    values, given, chosen_flags = {name: defaults.get(name) for name in slots}, set(), set()
    for token in (t.strip() for t in (arg or "").split(",")):
        if not token:
            continue
        slot = next((name for name, choices in slots.items() if token in choices), None)
        if slot is not None:
            if slot in given and values[slot] != token:
                raise ValueError(
                    f"{config_name} config arg {arg!r} names two values of {slot}: "
                    f"{values[slot]!r} and {token!r}; give one"
                )
            values[slot] = token
            given.add(slot)
        elif token in flags:
            chosen_flags.add(token)
        else:
            valid = [f"a {name} in {tuple(choices)}" for name, choices in slots.items()]
            valid += [f"one of the flags {tuple(flags)}"] if flags else []
            valid = " or ".join([", ".join(valid[:-1]), valid[-1]] if len(valid) > 1 else valid)
            raise ValueError(
                f"{config_name} config arg {arg!r}: "
                + (f"expected {usage}; " if usage else "")
                + (f"token {token!r} is not {valid}" if valid else "it takes no argument")
            )
    return values, chosen_flags


def language_arg(arg, config_name: str, allowed_flags=("smoke",)) -> tuple[str, set[str]]:
    """'<language>[,flag,...]' of the synthetic-language configs -> (language, flags)."""
    from didistill.data import text

    values, flags = parse_arg(
        arg,
        config_name,
        {"language": sorted(text.LANGUAGES)},
        allowed_flags,
        {"language": "markov"},
        usage="'<language>' or '<language>,<flag>'",
    )
    return values["language"], flags


def get_config():
    config = ml_collections.ConfigDict()
    config.method = ""  # a registered method name, or "package.module:factory"
    config.seed = 0
    # Engine keys, read by didistill.train (checked by didistill.train.validate).
    config.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            batch_size=256,  # global batch; must divide by the number of devices and hosts
            grad_accum_steps=1,  # micro-batches per step (supervised teachers; docs/scale.md)
            log_every=50,  # a metrics.jsonl line = the mean over these steps
            checkpoint_every=500,  # 0: save only at the end and on preemption
            keep_checkpoints=3,  # the newest N are kept
            keep_period=0,  # > 0: also keep every checkpoint at a multiple of this step
            max_nonfinite_steps=20,  # consecutive skipped (NaN/inf) steps before the run stops
            progress=True,  # tqdm progress bar on process 0
        )
    )
    # Mesh axes ('data', 'model'), data * model = all devices (-1: all devices left after
    # model); batches split over 'data'. fsdp: split every state leaf along its largest
    # dimension over 'data' (ZeRO-3 style) instead of replicating it. See docs/scale.md.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, fsdp=False))
    # Metric writers besides metrics.jsonl: "tensorboard", "wandb" or both, comma-separated
    # (didistill/train/writers.py); the wandb_* keys go to wandb.init ("" = wandb's default).
    config.logging = ml_collections.ConfigDict(
        dict(backends="", wandb_project="didistill", wandb_entity="", wandb_name="", wandb_mode="")
    )
    return config
