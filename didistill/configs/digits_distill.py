"""One-step distillation of the 8x8 digits EDM teacher (didistill/distill/one_step/images.py).

    --config=digits_distill:jensen_shannon     f-distill with a registered divergence
    --config=digits_distill:dmd2               a named method (dmd2, diff_instruct,
                                                          sid, uni_instruct), or with a
                                                          divergence: uni_instruct,forward_kl
    --config=digits_distill:forward_kl,scratch generator initialised from scratch
    --config=digits_distill:dmd2,smoke         tiny run for tests

The teacher is `assets/digits/teacher.msgpack`, trained by `configs/digits_teacher.py` (see
assets/README.md). The digits are prepared offline into `config.data.data_dir` on first use.
`image_distill_config` is the shared layout of the image configs (CIFAR-10 and ImageNet-64
configs start from it and set the published hyperparameters).
"""

from didistill.configs import one_step_common

FLAGS = one_step_common.IMAGE_FLAGS


def get_config(arg=None):
    method, divergence, flags = one_step_common.parse(arg, FLAGS, name="digits_distill")
    config = one_step_common.image_distill_config(method, divergence, flags)
    if "smoke" in flags:
        one_step_common.shrink_for_smoke(config)
    return config
