"""Image distillation configs: every arg parses, and the CIFAR-10 / ImageNet-64 smoke configs
run two jitted steps with a tiny random teacher of their resolution on random data."""

import os

import numpy as np
import pytest

from didistill.configs import cifar10_distill, digits_distill, digits_teacher, imagenet64_distill
from didistill.distill.one_step import method as one_step

ARGS = (
    "",
    "jensen_shannon",
    "forward_kl",
    "dmd2",
    "diff_instruct",
    "sid",
    "uni_instruct",
    "uni_instruct,forward_kl",
    "squared_hellinger,scratch",
    "dmd2,smoke",
)


@pytest.mark.parametrize("module", [digits_distill, cifar10_distill, imagenet64_distill])
@pytest.mark.parametrize("arg", ARGS)
def test_every_arg_parses_and_validates(module, arg):
    config = module.get_config(arg)
    one_step.validate(config)
    assert config.data.kind == "images"
    assert config.train.batch_size % 4 == 0
    assert config.generator.sigma in (1.0, 2.5, 80.0)  # Diff-Instruct, SiD, FastGen
    if "smoke" in arg:
        assert config.train.batch_size <= 8 and config.eval.num_samples <= 8


def test_published_settings():
    cifar = cifar10_distill.get_config()
    assert (cifar.method, cifar.distill.divergence) == ("f_distill", "forward_kl")
    # FastGen: 100k iterations, 4 critic + 1 generator update per 5, EMA 0.9999 per iteration
    assert cifar.train.batch_size == 2048 and cifar.distill.critic_steps == 4
    assert cifar.train.num_steps == 20_000 and cifar.ema_decay == 0.9999**5
    assert cifar.optim_generator.grad_clip_norm == 10.0
    assert (cifar.distill.min_index, cifar.distill.max_index) == (2, 998)
    assert cifar.distill.gan_weight == 1e-3 and cifar.optim_generator.learning_rate == 1e-4
    assert tuple(cifar.discriminator.resolutions) == (32, 16, 8)
    imnet = imagenet64_distill.get_config()
    assert imnet.distill.divergence == "jensen_shannon" and imnet.distill.ratio_ema_rate == 0.5
    assert imnet.train.batch_size == 512 and imnet.distill.gan_weight == 3e-3
    assert imnet.optim_generator.learning_rate == 2e-6
    assert imagenet64_distill.get_config("dmd2").train.batch_size == 280
    sid = cifar10_distill.get_config("sid")
    assert sid.generator.sigma == 2.5 and sid.distill.gan_weight == 0.0
    assert sid.distill.noise == "sid" and sid.distill.tmax == 800
    assert sid.distill.fake_score_noise == "lognormal" and sid.distill.fake_score_weight == "edm"
    assert sid.distill.ema_halflife_images == 500_000 and sid.distill.ema_rampup_ratio == 0.05
    # Inception FID of 50k samples against EDM's reference, periodic 5k FIDs, kept checkpoints
    for config, ref in ((cifar, "cifar10-32x32.npz"), (imnet, "imagenet-64x64.npz")):
        assert config.eval.fid.num_samples == 50_000 and config.eval.fid.reference.endswith(ref)
        assert config.eval.fid.inception.endswith("inception_fid.npz")
        assert config.eval.every == config.train.keep_period == 5000
        assert config.model.compute_dtype == "float32"
    assert cifar10_distill.get_config("dmd2,smoke").eval.fid.inception == ""
    di = cifar10_distill.get_config("diff_instruct")
    assert di.generator.sigma == 1.0 and di.train.batch_size == 128
    assert di.distill.noise == "lognormal"


def test_bad_arg_names_the_choices():
    with pytest.raises(ValueError, match="not a method"):
        cifar10_distill.get_config("nonsense")
    digits_teacher.get_config("smoke")


FULL = os.environ.get("DIDISTILL_SLOW_TESTS") == "1"  # the configs' real discriminator levels


@pytest.mark.parametrize(
    "module,resolution,label_dim", [(cifar10_distill, 32, 10), (imagenet64_distill, 64, 1000)]
)
def test_smoke_config_runs_two_steps(module, resolution, label_dim, tmp_path, monkeypatch):
    """Two steps at the dataset's image size and label count, with a tiny teacher of the
    architecture the config's real teacher has (DDPM++ for CIFAR-10, ADM for ImageNet-64). By
    default it has one U-Net level (compiling a deeper one costs minutes on a loaded CPU), so
    the head reads its only feature map; DIDISTILL_SLOW_TESTS=1 uses levels down to 8x8 (ADM
    with attention at 8x8) and the config's discriminator resolutions."""
    from didistill.data import images
    from didistill.nets.convert_edm import load_unet
    from tests.teachers import random_data, save_tiny_unet_teacher
    from tests.test_adm import save_tiny_adm_teacher
    from tests.test_one_step_images import run_two_steps

    levels = int(np.log2(resolution // 8)) + 1 if FULL else 1
    mult, path = (1,) * levels, tmp_path / "t.msgpack"
    if module is imagenet64_distill:
        attn = (8,) if FULL else ()
        teacher = save_tiny_adm_teacher(path, resolution, label_dim, mult, attn_resolutions=attn)
    else:
        teacher = save_tiny_unet_teacher(path, resolution, 3, label_dim, channel_mult=mult)
    data = random_data((resolution, resolution, 3), label_dim)
    monkeypatch.setattr(images, "load_arrays", lambda cfg, split="train": data)
    config = module.get_config("dmd2,smoke")
    config.teacher.checkpoint = teacher
    if not FULL:
        config.discriminator.resolutions = (resolution,)
    arch = "adm" if module is imagenet64_distill else "unet"
    assert load_unet(teacher)[2]["net"]["arch"] == arch
    _, _, batch = run_two_steps(config)
    assert batch["x"].shape == (4, 1, resolution, resolution, 3)
    assert batch["label"].shape == (4, 1) and np.all(batch["label"] < label_dim)
