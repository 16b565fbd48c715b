"""FastGen's DMD2 step in plain PyTorch: `critic_steps` fake-score (and discriminator)
updates, then one generator update with the variational score distillation (VSD) loss (and
the GAN term).

Transcribed (facts, not code) from NVlabs/FastGen @ 34f30e8ff1a563555fc0c7d59f1c1409dacd8af2:
- `fastgen/methods/distribution_matching/dmd2.py` 319-360 (`_fake_score_discriminator_update_step`):
  x0 = G(z) under no_grad, x_t = x0 + sigma eps, fake-score loss
  `denoising_score_matching_loss('x0')` = mse(x0, D_psi(x_t)), mean over every element
  (`fastgen/methods/common_loss.py` 12-60);
- the same file 187-240 (`_student_update_step`): x0 = G(z) with gradients, x_t = x0 + sigma eps,
  D_psi(x_t) and the teacher D_phi(x_t) under no_grad, loss = VSD (+ GAN weight x GAN loss,
  left out here: weight 0);
- `common_loss.py` 63-103 (`variational_score_distillation_loss`): w = 1 / (mean_dims
  |x0 - D_phi| + 1e-6) (no grad), target = sg(x0 - (D_psi - D_phi) w),
  loss = 0.5 mse(x0, target) (mean over every element).
The GAN branch (`DMDStep(..., discriminator=...)`, FastGen's `gan_loss_weight_gen` > 0):
- `fastgen/networks/discriminators.py` 34-54 (`_get_optimal_groups`) and 62-137
  (`Discriminator_EDM`): one head per feature resolution r >= 8: (conv 4x4 stride 2 pad 1,
  GroupNorm, SiLU) while r > 8, then the same 8 -> 4, conv 4x4 stride 4 (4 -> 1), GroupNorm,
  SiLU, conv 1x1 to one logit; GroupNorm eps 1e-5 (torch's default); logits [B, heads];
- `dmd2.py` 364-386: in the critic update, the teacher's encoder features (no grad,
  `return_features_early`) of the fake x_t and of the real data noised at its own sigma and
  noise (`_compute_real_feat` 250-285, `gan_use_same_t_noise=False`, the default of
  `configs/methods/config_dmd2.py` 43), loss = fake-score loss + `gan_loss_discriminator`,
  one backward, both optimisers step (`get_optimizers` 473-486); R1 off (weight 0, line 49);
- `dmd2.py` 124-156 and 226-238: in the generator update one teacher pass gives D_phi
  (detached) and the features (with gradients to the input), loss = VSD +
  `gan_loss_weight_gen` (1e-3) x `gan_loss_generator`; the fake score and the discriminator
  do not train then (`_setup_grad_requirements` 67-77);
- `common_loss.py` 106-136: generator softplus(-logits).mean(), discriminator
  softplus(fake).mean() + softplus(-real).mean().
Optimisers as `configs/cifar10_distill.py:dmd2` (FastGen's CIFAR-10 DMD2): AdamW lr 1e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01 for the generator, the fake score and the
discriminator (FastGen `configs/opt.py` 44-51), the generator's gradients clipped at global norm 10
(`configs/callbacks.py` GradClip_CALLBACK: `model_key="net"`, the generator only).

The generator is the one-step student G(z, y) = D_theta(sigma_g z; sigma_g, y). All noise
(z, labels, sigma, eps) is passed in, so the same numbers drive this step and ours.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _groups(channels: int) -> int:
    """FastGen's `_get_optimal_groups`."""
    if channels <= 32:
        return max(1, channels // 4)
    groups = 32
    while groups > 1 and channels % groups:
        groups -= 1
    return groups


class DiscriminatorEDM(torch.nn.Module):
    """FastGen's `Discriminator_EDM`: feats (list of [B, C, r, r], r in `resolutions`) ->
    logits [B, heads]."""

    def __init__(self, resolutions, channels: int):
        super().__init__()
        self.resolutions = list(resolutions)
        heads = []
        for res in self.resolutions:
            if res < 8:
                raise ValueError(
                    f"FastGen's Discriminator_EDM needs feature maps >= 8x8, got {res}"
                )
            layers = []
            for stride, pad in [(2, 1)] * (res.bit_length() - 4) + [(2, 1), (4, 0)]:
                layers += [
                    torch.nn.Conv2d(channels, channels, 4, stride, pad),
                    torch.nn.GroupNorm(_groups(channels), channels),
                    torch.nn.SiLU(),
                ]
            layers.append(torch.nn.Conv2d(channels, 1, 1))
            heads.append(torch.nn.Sequential(*layers))
        self.discriminator_heads = torch.nn.ModuleList(heads)

    def forward(self, feats):
        return torch.cat(
            [
                head(f).reshape(-1, 1)
                for head, f in zip(self.discriminator_heads, feats, strict=True)
            ],
            dim=1,
        )


def discriminator_from_flax(variables, resolutions, channels: int) -> DiscriminatorEDM:
    """A `DiscriminatorEDM` with the weights of our `nets.unet.LogitHeads` `variables` (flax
    names '{r}x{r}_conv{i}' / '_norm{i}' / '_out'; kernels [kh, kw, in, out] -> [out, in, kh,
    kw]), strict load."""
    module = DiscriminatorEDM(resolutions, channels)
    p, state = variables["params"], {}
    for h, res in enumerate(resolutions):
        n = res.bit_length() - 2  # conv blocks: r -> ... -> 4 (stride 2), 4 -> 1
        for i in range(n):
            conv, norm = p[f"{res}x{res}_conv{i}"], p[f"{res}x{res}_norm{i}"]
            state[f"discriminator_heads.{h}.{3 * i}.weight"] = np.transpose(
                conv["kernel"], (3, 2, 0, 1)
            )
            state[f"discriminator_heads.{h}.{3 * i}.bias"] = conv["bias"]
            state[f"discriminator_heads.{h}.{3 * i + 1}.weight"] = norm["scale"]
            state[f"discriminator_heads.{h}.{3 * i + 1}.bias"] = norm["bias"]
        out = p[f"{res}x{res}_out"]
        state[f"discriminator_heads.{h}.{3 * n}.weight"] = np.transpose(out["kernel"], (3, 2, 0, 1))
        state[f"discriminator_heads.{h}.{3 * n}.bias"] = out["bias"]
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module


def gan_loss_generator(fake_logits):
    return F.softplus(-fake_logits).mean()


def gan_loss_discriminator(real_logits, fake_logits):
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def vsd_loss(x0, d_teacher, d_fake):
    """FastGen's `variational_score_distillation_loss` (float32 throughout here)."""
    with torch.no_grad():
        dims = tuple(range(1, x0.ndim))
        w = 1 / ((x0 - d_teacher).abs().mean(dim=dims, keepdim=True) + 1e-6)
        target = x0 - (d_fake - d_teacher) * w
    return 0.5 * F.mse_loss(x0, target, reduction="mean")


class DMDStep:
    """One engine step: `critic_steps` fake-score (and discriminator) updates, then one
    generator update.

    `generator`, `fake_score`, `teacher`: `edm_unet.EDMPrecond` modules (eval mode: no dropout);
    `discriminator`: a `DiscriminatorEDM` on the teacher's features at its resolutions, or None
    (no GAN branch). `__call__(inputs)` takes the torch tensors of `inputs` (see
    `benchmarks.peers`): critic_z / critic_eps [K, B, C, H, W], critic_sigma [K, B], critic_y
    [K, B, L] one-hot (or None), with a discriminator also critic_real / critic_real_eps [K, B,
    C, H, W] and critic_real_sigma [K, B] (real images share the labels, as FastGen's batch);
    and gen_z, gen_eps, gen_sigma, gen_y for the generator update. Returns (fake-score losses
    [K], VSD loss) without a discriminator, else (fake-score losses [K], discriminator losses
    [K], VSD loss, generator GAN loss).
    """

    def __init__(self, generator, fake_score, teacher, sigma_g: float, compile_nets=False,
                 discriminator=None, gan_weight: float = 1e-3):  # fmt: skip
        self.sigma_g, self.gan_weight = sigma_g, gan_weight
        self.params = (generator, fake_score, discriminator)
        for p in teacher.parameters():
            p.requires_grad_(False)
        adamw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        self.opt_g = torch.optim.AdamW(generator.parameters(), **adamw)
        self.opt_f = torch.optim.AdamW(fake_score.parameters(), **adamw)
        self.opt_d = (
            torch.optim.AdamW(discriminator.parameters(), **adamw)
            if discriminator is not None
            else None
        )
        self.res = tuple(discriminator.resolutions) if discriminator is not None else ()
        wrap = torch.compile if compile_nets else (lambda m: m)
        nets = (generator, fake_score, teacher, discriminator)
        self.generator, self.fake_score, self.teacher, self.discriminator = (
            None if m is None else wrap(m) for m in nets
        )

    def generate(self, z, y):
        sigma = torch.full((z.shape[0],), self.sigma_g)
        return self.generator(self.sigma_g * z, sigma, y)

    def _train_critics(self, on: bool):  # FastGen's _setup_grad_requirements
        for net in self.params[1:]:
            if net is not None:
                net.requires_grad_(on)

    def critic_update(self, z, y, sigma, eps, real=None, real_sigma=None, real_eps=None):
        self._train_critics(True)
        with torch.no_grad():
            x0 = self.generate(z, y)
            xt = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        loss_f = F.mse_loss(x0, self.fake_score(xt, sigma, y), reduction="mean")
        loss, loss_d = loss_f, None
        if self.discriminator is not None:
            with torch.no_grad():
                fake_feat = self.teacher(xt, sigma, y, features=self.res, early=True)
                real_t = real + real_sigma.reshape(-1, 1, 1, 1) * real_eps
                real_feat = self.teacher(real_t, real_sigma, y, features=self.res, early=True)
            loss_d = gan_loss_discriminator(
                self.discriminator(real_feat), self.discriminator(fake_feat)
            )
            loss = loss_f + loss_d
            self.opt_d.zero_grad(set_to_none=True)
        self.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_f.step()
        if self.opt_d is not None:
            self.opt_d.step()
        return loss_f.detach(), None if loss_d is None else loss_d.detach()

    def generator_update(self, z, y, sigma, eps):
        self._train_critics(False)
        x0 = self.generate(z, y)
        xt = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        with torch.no_grad():
            d_fake = self.fake_score(xt, sigma, y)
        if self.discriminator is not None:  # one teacher pass: D_phi and the features
            d_teacher, feats = self.teacher(xt, sigma, y, features=self.res)
            gan = gan_loss_generator(self.discriminator(feats))
            d_teacher = d_teacher.detach()
        else:
            with torch.no_grad():
                d_teacher = self.teacher(xt, sigma, y)
            gan = None
        vsd = vsd_loss(x0, d_teacher, d_fake)
        loss = vsd if gan is None else vsd + self.gan_weight * gan
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params[0].parameters(), 10.0)
        self.opt_g.step()
        return vsd.detach(), None if gan is None else gan.detach()

    def __call__(self, inp):
        gan = self.discriminator is not None
        critic = []
        for i in range(inp["critic_z"].shape[0]):
            real = ()
            if gan:
                real = (inp["critic_real"][i], inp["critic_real_sigma"][i])
                real += (inp["critic_real_eps"][i],)
            critic.append(self.critic_update(
                inp["critic_z"][i], None if inp["critic_y"] is None else inp["critic_y"][i],
                inp["critic_sigma"][i], inp["critic_eps"][i], *real,
            ))  # fmt: skip
        vsd, gan_gen = self.generator_update(
            inp["gen_z"], inp["gen_y"], inp["gen_sigma"], inp["gen_eps"]
        )
        fake = torch.stack([c[0] for c in critic])
        if not gan:
            return fake, vsd
        return fake, torch.stack([c[1] for c in critic]), vsd, gan_gen


__all__ = [
    "DMDStep", "DiscriminatorEDM", "discriminator_from_flax", "gan_loss_discriminator",
    "gan_loss_generator", "vsd_loss",
]  # fmt: skip
