"""One-step distillation of EDM's class-conditional CIFAR-10 teacher, published settings.

    --config=cifar10_distill                   f-distill, forward KL (FastGen)
    --config=cifar10_distill:jensen_shannon    f-distill with another divergence
    --config=cifar10_distill:dmd2              DMD2 (reverse KL + GAN)
    --config=cifar10_distill:sid               SiD (alpha 1.2, no GAN)
    --config=cifar10_distill:uni_instruct      Uni-Instruct (forward KL + GAN)
    --config=cifar10_distill:dmd2,smoke        two tiny steps, for tests

Teacher: `data/edm/edm-cifar10-cond.msgpack`, EDM's edm-cifar10-32x32-cond-vp converted by

    python -m didistill.nets.convert_edm edm-cifar10-cond.npz data/edm/edm-cifar10-cond.msgpack \\
        --config=edm-cifar10-cond

(the .npz export is described in didistill/nets/convert_edm.py); data: tfds `cifar10` prepared
in array_record format under `config.data.data_dir` (see didistill/data/images.py).

Hyperparameters: every reference setting, its key here and same / deviation is in
docs/one_step_settings.md. A step is one generator update (see one_step.method).
- f_distill / dmd2 [FastGen config_f_distill_cifar10 / config_dmd2_cifar10 @34f30e8]: global
  batch 2048, AdamW lr 1e-4 for all three networks, GAN weight 1e-3 (on the mean-reduced
  distribution-matching loss, as in FastGen), discriminator heads on the teacher's 32/16/8
  features (width 256 = the feature channels); 100k FastGen iterations = 20k steps with
  critic_steps 4 and EMA 0.9999^5 per step; generator gradient clipped at norm 10; Karras
  indices [2, 998]; fake score: unweighted x0-MSE at the same noise; R1 off (FastGen default).
- sid / uni_instruct [SiD run_sid.sh, Uni-Instruct run_uni_instruct.sh]: batch 256, Adam lr
  1e-5, betas (0, 0.999), generator input 2.5 z at sigma 2.5, sigma from u ~ U[0, 0.8),
  fake score at lognormal(-1.2, 1.2) with EDM's lambda, EMA half-life 0.5 Mimg with ramp-up
  0.05. Uni-Instruct's GAN weight is its loss-scale ratio lsg_gan / lsg = 0.01 / 100.
- diff_instruct [pkulwj1994/diff_instruct]: batch 128, generator input 1.0 z, lognormal noise.
"""

from didistill.configs import one_step_common as common
from didistill.distill.one_step import table

TEACHER = "data/edm/edm-cifar10-cond.msgpack"


def get_config(arg=None):
    method, divergence, flags = common.parse(
        arg, common.IMAGE_FLAGS, "forward_kl", "cifar10_distill"
    )
    config = common.image_distill_config(method, divergence, flags)
    config.data.name = "cifar10"
    config.teacher.checkpoint = TEACHER
    config.discriminator.resolutions = (32, 16, 8)
    config.discriminator.width = 0  # the feature channels: 256 for EDM's DDPM++ (FastGen)
    config.eval.num_samples = 10_000
    config.eval.batch_size = 500
    config.eval.feature_checkpoint = ""
    # Inception FID, 50k samples (python -m didistill.prepare inception; fid-refs cifar10)
    config.eval.fid = common.fid_block(reference="cifar10")
    config.eval.every = 5000  # sample grid and a 5k-sample FID every 5000 steps
    config.train.keep_period = 5000  # keep those checkpoints, for a FID-vs-step curve
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    d = config.distill
    if table.METHODS[method].recipe == "sid":
        for opt in (config.optim_generator, config.optim_fake_score, config.optim_discriminator):
            opt.update(dict(name="adam", learning_rate=1e-5, b1=0.0, b2=0.999))
        config.train.batch_size = 128 if method == "diff_instruct" else 256
        config.train.num_steps = 500_000_000 // config.train.batch_size  # 500 Mimg (SiD)
        common.sid_ema(config, 500_000)
        d.critic_steps = 1
        # Uni-Instruct: lsg_gan 0.01 against lsg 100 on a sum-reduced score term
        d.gan_weight = 0.01 / 100 if table.METHODS[method].gan else 0.0
        if method == "uni_instruct":  # fsim_training_loop.py: GAN after 200k images, etc.
            d.update(gan_warmup_images=200_000, generator_freeze_images=100_000)
            d.critic_grad_clip = 1.0
    else:
        for opt in (config.optim_generator, config.optim_fake_score, config.optim_discriminator):
            opt.update(dict(name="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.01))
        config.optim_generator.grad_clip_norm = 10.0  # FastGen GradClip_CALLBACK (generator)
        config.train.batch_size = 2048
        common.fastgen_schedule(config, iterations=100_000)
        d.gan_weight = 1e-3
        d.min_index, d.max_index = 2, 998
    if "smoke" in flags:
        common.shrink_for_smoke(config)
    return config
