"""Classifiers on scikit-learn's 8x8 digits (method 'classifier', didistill/distill/kd.py).

    --config=digits_classifier:teacher          the KD teacher (CNN)
    --config=digits_classifier:student          the no-KD baseline: the KD student
                                                            network trained on labels only
    --config=digits_classifier:teacher,smoke    tiny network and run, for tests

The data is `didistill.data.images` 'digits' (1500 train / 297 test, stratified), prepared
offline into config.data.data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets) on first use.
Training images are shifted by up to `data.max_shift` pixels (the teacher and every student
see the same augmentation). The run writes eval.json and classifier_params.msgpack (the EMA
params and the net config); the shipped teacher assets/digits/classifier_teacher.msgpack is
that file of a `teacher` run (see assets/README.md for the command).
"""

import ml_collections

from didistill.configs import base

ROLES = ("teacher", "student")
METHOD = "classifier"  # didistill.distill.kd:make_classifier_method


def parse_arg(arg, name="digits_classifier", roles=ROLES):
    """(role, smoke) from "<role>[,smoke]"; ValueError naming the valid roles."""
    values, flags = base.parse_arg(arg, name, {"role": roles}, ("smoke",), {"role": roles[0]})
    return values["role"], "smoke" in flags


def teacher_net():
    """The teacher: a CNN with 32 and 64 channels (8 -> 4 -> 2) and 128 features (53k params)."""
    return ml_collections.ConfigDict(
        dict(kind="cnn", widths=(32, 64), hidden=128, dropout=0.1, num_classes=10)
    )


def student_net():
    """The student: an MLP with one hidden layer of 32 units (2.4k params)."""
    return ml_collections.ConfigDict(
        dict(kind="mlp", widths=(32,), hidden=128, dropout=0.0, num_classes=10)
    )


def common(config, smoke: bool):
    """Data, optimizer, EMA, evaluation and run length shared by the classifiers and KD."""
    config.data = ml_collections.ConfigDict(dict(name="digits", data_dir="", max_shift=1))
    config.optim = base.optimizer(learning_rate=3e-3, name="adamw", weight_decay=1e-4)
    config.ema_decay = 0.99
    config.eval = ml_collections.ConfigDict(dict(num_bins=15))  # ECE bins
    config.train.num_steps = 2000
    config.train.batch_size = 128
    config.train.log_every = 100
    config.train.checkpoint_every = 0
    config.train.keep_checkpoints = 1
    if smoke:
        config.train.num_steps = 30
        config.train.batch_size = 32
        config.train.log_every = 10
        config.train.progress = False
    return config


def get_config(arg=None):
    role, smoke = parse_arg(arg)
    config = base.get_config()
    config.method = METHOD
    config.net = teacher_net() if role == "teacher" else student_net()
    common(config, smoke)
    if smoke:
        config.net.widths = (16,) if role == "student" else (8, 8)
        config.net.hidden = 16
    return config
