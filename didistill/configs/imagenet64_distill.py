"""One-step distillation of a class-conditional ImageNet-64 EDM teacher, published settings.

    --config=imagenet64_distill                 f-distill, Jensen-Shannon (FastGen)
    --config=imagenet64_distill:forward_kl      f-distill with another divergence
    --config=imagenet64_distill:dmd2            DMD2 (reverse KL + GAN)
    --config=imagenet64_distill:sid             SiD
    --config=imagenet64_distill:uni_instruct    Uni-Instruct
    --config=imagenet64_distill:dmd2,smoke      two tiny steps, for tests

Teacher: `data/edm/edm-imagenet64-cond.msgpack`, EDM's released class-conditional ImageNet-64
model (edm-imagenet-64x64-cond-adm.pkl: an ADM network, `didistill.nets.adm.ADMDenoiser`,
295.9M parameters, encoder levels 64/32/16/8) converted by `didistill.nets.convert_edm`.
Export its state dict with EDM's code (see the docstring of convert_edm), then convert:

    python -c "import pickle, numpy as np, dnnlib; \\
        net = pickle.load(open('edm-imagenet-64x64-cond-adm.pkl', 'rb'))['ema']; \\
        np.savez('edm-imagenet64-cond.npz', \\
                 **{k: v.cpu().numpy() for k, v in net.state_dict().items()})"  # in NVlabs/edm
    python -m didistill.nets.convert_edm edm-imagenet64-cond.npz \\
        data/edm/edm-imagenet64-cond.msgpack --config=edm-imagenet64-cond

Any U-Net network file of a label_dim-1000 64x64 network with an 8x8 encoder level
(ADM or DDPM++) also works. Data: tfds `imagenet_resized/64x64` prepared in array_record
format under `config.data.data_dir` (see didistill/data/images.py).

Hyperparameters: every reference setting, its key here and same / deviation is in
docs/one_step_settings.md. A step is one generator update (see one_step.method).
- f_distill [FastGen config_f_distill_in64 @34f30e8]: global batch 512, AdamW lr 2e-6,
  weight decay 0.01, GAN weight 3e-3, bottleneck-only discriminator (8x8, width 768 = the
  feature channels), ratio_ema_rate 0.5, 600k FastGen iterations = 120k steps with
  critic_steps 4 and EMA 0.9999^5, generator gradient clip 10, Karras indices [2, 998].
- dmd2 [DMD2 experiments/imagenet, main/edm]: batch 280, AdamW lr 2e-6, 500 warm-up steps,
  gradient clip 10 (all networks), GAN weight 3e-3, fake-score update every iteration and
  generator every 5th (critic_steps 5), 200k iterations = 40k steps, fake score weighted
  1/sigma^2 + 1/sigma_data^2 over all 1000 indices; DMD2 has no EMA (0.9999^5 kept here).
- sid / uni_instruct [SiD, Uni-Instruct]: batch 8192, Adam lr 4e-6, betas (0, 0.999), input
  2.5 z at sigma 2.5, sigma from u ~ U[0, 0.8), EMA half-life 2 Mimg with ramp-up 0.05.
bf16: --config.model.compute_dtype=bfloat16 (float32 parameters and losses).
"""

from didistill.configs import one_step_common as common
from didistill.distill.one_step import table

TEACHER = "data/edm/edm-imagenet64-cond.msgpack"


def get_config(arg=None):
    method, divergence, flags = common.parse(
        arg, common.IMAGE_FLAGS, "jensen_shannon", "imagenet64_distill"
    )
    config = common.image_distill_config(method, divergence, flags)
    config.data.name = "imagenet64"
    config.teacher.checkpoint = TEACHER
    config.discriminator.resolutions = (8,)
    config.discriminator.width = 0  # the feature channels: 768 for EDM's ADM (FastGen)
    config.eval.num_samples = 10_000
    config.eval.batch_size = 250
    config.eval.feature_checkpoint = ""
    # Inception FID, 50k samples (python -m didistill.prepare inception; fid-refs imagenet64)
    config.eval.fid = common.fid_block(reference="imagenet64")
    config.eval.every = 5000  # sample grid and a 5k-sample FID every 5000 steps
    config.train.keep_period = 5000  # keep those checkpoints, for a FID-vs-step curve
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    d = config.distill
    opts = (config.optim_generator, config.optim_fake_score, config.optim_discriminator)
    if table.METHODS[method].recipe == "sid":
        for opt in opts:
            opt.update(dict(name="adam", learning_rate=4e-6, b1=0.0, b2=0.999))
        config.train.batch_size = 8192
        config.train.num_steps = 1_000_000_000 // 8192  # 1000 Mimg (SiD)
        common.sid_ema(config, 2_000_000)
        d.critic_steps = 1
        d.gan_weight = 0.01 / 100 if table.METHODS[method].gan else 0.0  # lsg_gan / lsg
        if method == "uni_instruct":  # fsim_training_loop.py: GAN after 200k images, etc.
            d.update(gan_warmup_images=200_000, generator_freeze_images=100_000)
            d.critic_grad_clip = 1.0
    else:
        for opt in opts:
            opt.update(dict(name="adamw", learning_rate=2e-6, b1=0.9, b2=0.999, weight_decay=0.01))
        d.gan_weight = 3e-3
        if method == "dmd2":  # DMD2's own code: guidance every iteration, generator every 5th
            config.train.batch_size = 280
            common.fastgen_schedule(config, iterations=200_000)
            d.critic_steps = 5
            d.fake_score_noise, d.fake_score_weight = "all_indices", "karras"
            for opt in opts:
                opt.update(dict(warmup_steps=500, grad_clip_norm=10.0))
        else:
            config.train.batch_size = 512
            common.fastgen_schedule(config, iterations=600_000)
            config.optim_generator.grad_clip_norm = 10.0
            d.ratio_ema_rate = 0.5
            d.min_index, d.max_index = 2, 998
    if "smoke" in flags:
        common.shrink_for_smoke(config)
    return config
