"""One-step distillation of EDM's class-conditional CIFAR-10 teacher, published settings.

    --config=configs/cifar10_distill.py                   f-distill, forward KL (FastGen)
    --config=configs/cifar10_distill.py:jensen_shannon    f-distill with another divergence
    --config=configs/cifar10_distill.py:dmd2              DMD2 (reverse KL + GAN)
    --config=configs/cifar10_distill.py:sid               SiD (alpha 1.2, no GAN)
    --config=configs/cifar10_distill.py:uni_instruct      Uni-Instruct (forward KL + GAN)
    --config=configs/cifar10_distill.py:dmd2,smoke        two tiny steps, for tests

Teacher: `data/edm/edm-cifar10-cond.msgpack`, EDM's edm-cifar10-32x32-cond-vp converted by

    python -m didistill.nets.convert_edm edm-cifar10-cond.npz data/edm/edm-cifar10-cond.msgpack \\
        --config=edm-cifar10-cond

(the .npz export is described in didistill/nets/convert_edm.py); data: tfds `cifar10` prepared
in array_record format under `config.data.data_dir` (see didistill/data/images.py).

Hyperparameters (reference/continuous_distillation.md 1.4, 2.4, 3.3, 3.4):
- f_distill / dmd2 [f-distill Table 5, FastGen config_f_distill_cifar10]: global batch 2048,
  AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.01, no warm-up, for all three networks;
  fake-score update frequency 5 (= critic_steps), GAN weight 1e-3, discriminator on the
  teacher's 32/16/8 features (head width 256), EMA 0.9999, 60k iterations (paper; FastGen
  100k), generator input 80 z at sigma 80, time indices [2, 998). Not implemented: R1 (paper
  gamma 1; FastGen default 0).
- sid / uni_instruct [SiD run_sid.sh, Uni-Instruct run_uni_instruct.sh]: batch 256, Adam lr
  1e-5, betas (0, 0.999), generator input 2.5 z at sigma 2.5, EMA half-life 0.5 Mimg
  (decay 0.5^(256 / 5e5) per step), Uni-Instruct GAN weight 0.01. Not implemented: SiD's
  generator loss scale 100 (Adam is scale-invariant up to eps) and its time range u ~ U[0, 0.8].
Ready for GPU/TPU: the batch is sharded over the 'data' mesh axis by the engine.
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
    config.discriminator.width = 256
    config.eval.num_samples = 10_000
    config.eval.batch_size = 500
    config.eval.feature_checkpoint = ""  # no Inception FID in this method's evaluate yet
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    d = config.distill
    if table.METHODS[method].recipe == "sid":
        for opt in (config.optim_generator, config.optim_fake_score, config.optim_discriminator):
            opt.update(dict(name="adam", learning_rate=1e-5, b1=0.0, b2=0.999))
        config.train.batch_size = 256
        config.ema_decay = 0.5 ** (256 / 500_000)
        config.train.num_steps = 500_000_000 // 256  # 500 Mimg (SiD)
        d.critic_steps = 1
        d.gan_weight = 0.01 if table.METHODS[method].gan else 0.0
    else:
        for opt in (config.optim_generator, config.optim_fake_score, config.optim_discriminator):
            opt.update(dict(name="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.01))
        config.train.batch_size = 2048
        config.ema_decay = 0.9999
        config.train.num_steps = 60_000
        d.critic_steps = 5
        d.gan_weight = 1e-3
        d.min_index, d.max_index = 2, 998
    if "smoke" in flags:
        common.shrink_for_smoke(config)
    return config
