"""FastGen's DMD2 step without its GAN branch, in plain PyTorch: `critic_steps` fake-score
updates, then one generator update with the variational score distillation (VSD) loss.

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
Optimisers as `configs/cifar10_distill.py:dmd2` (FastGen's CIFAR-10 DMD2): AdamW lr 1e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01 for the generator and the fake score, the
generator's gradients clipped at global norm 10.

The generator is the one-step student G(z, y) = D_theta(sigma_g z; sigma_g, y). All noise
(z, labels, sigma, eps) is passed in, so the same numbers drive this step and ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vsd_loss(x0, d_teacher, d_fake):
    """FastGen's `variational_score_distillation_loss` (float32 throughout here)."""
    with torch.no_grad():
        dims = tuple(range(1, x0.ndim))
        w = 1 / ((x0 - d_teacher).abs().mean(dim=dims, keepdim=True) + 1e-6)
        target = x0 - (d_fake - d_teacher) * w
    return 0.5 * F.mse_loss(x0, target, reduction="mean")


class DMDStep:
    """One engine step: `critic_steps` fake-score updates, then one generator update.

    `generator`, `fake_score`, `teacher`: `edm_unet.EDMPrecond` modules (eval mode: no dropout).
    `__call__(inputs)` takes the torch tensors of `inputs` (see `benchmarks.peers`):
    critic_z / critic_eps [K, B, C, H, W], critic_sigma [K, B], critic_y [K, B, L] one-hot (or
    None), and gen_z, gen_eps, gen_sigma, gen_y for the generator update; returns
    (fake-score losses [K], generator loss) as floats.
    """

    def __init__(self, generator, fake_score, teacher, sigma_g: float, compile_nets=False):
        self.sigma_g = sigma_g
        self.params = (generator, fake_score)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.opt_g = torch.optim.AdamW(generator.parameters(), 1e-4, (0.9, 0.999), 1e-8, 0.01)
        self.opt_f = torch.optim.AdamW(fake_score.parameters(), 1e-4, (0.9, 0.999), 1e-8, 0.01)
        wrap = torch.compile if compile_nets else (lambda m: m)
        self.generator, self.fake_score, self.teacher = map(wrap, (generator, fake_score, teacher))

    def generate(self, z, y):
        sigma = torch.full((z.shape[0],), self.sigma_g)
        return self.generator(self.sigma_g * z, sigma, y)

    def critic_update(self, z, y, sigma, eps):
        with torch.no_grad():
            x0 = self.generate(z, y)
            xt = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        loss = F.mse_loss(x0, self.fake_score(xt, sigma, y), reduction="mean")
        self.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_f.step()
        return loss.detach()

    def generator_update(self, z, y, sigma, eps):
        x0 = self.generate(z, y)
        xt = x0 + sigma.reshape(-1, 1, 1, 1) * eps
        with torch.no_grad():
            d_fake = self.fake_score(xt, sigma, y)
            d_teacher = self.teacher(xt, sigma, y)
        loss = vsd_loss(x0, d_teacher, d_fake)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params[0].parameters(), 10.0)
        self.opt_g.step()
        return loss.detach()

    def __call__(self, inp):
        critic = [
            self.critic_update(
                inp["critic_z"][i],
                None if inp["critic_y"] is None else inp["critic_y"][i],
                inp["critic_sigma"][i],
                inp["critic_eps"][i],
            )
            for i in range(inp["critic_z"].shape[0])
        ]
        gen = self.generator_update(inp["gen_z"], inp["gen_y"], inp["gen_sigma"], inp["gen_eps"])
        return torch.stack(critic), gen


__all__ = ["DMDStep", "vsd_loss"]
