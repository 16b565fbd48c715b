"""DiDi-Instruct's discriminator and student updates in plain PyTorch, on MDLM's DiT (`mdlm.DIT`).

Transcribed (facts, not code) from the authors' training-code release of
haoyangzheng-ai/didi-instruct's `algo.py` (class `DiDiInstruct`; the mirrored commit 7825a02
has these methods as stubs; the release was read in the public code index, as for
`tests/parity/test_parity_didi_instruct.py`: its stored copy there is file id 59264924364,
34,288 characters, cited by method name):
- `DiscriminatorHead`: spectral_norm(Linear(D, D)) -> SiLU -> spectral_norm(Linear(D, 1)) per
  token, replacing the DiT's whole output layer (final norm included); the discriminator is a
  copy of the teacher with only the last K blocks (and the head) trainable
  (`discriminator_unfreeze_blocks`); torch's `spectral_norm` does one power iteration per
  forward in training mode, which the discriminator stays in;
- `training_step`: the student's two-step trajectory m -> z_tau -> x (`_get_backward`: the
  ancestral update q(z_s) = p_x0 (alpha_s - alpha_t) on tokens, 1 - alpha_s on [MASK], a
  Gumbel-max draw, unmasked tokens copied; log-probabilities of log_softmax(log(p_x0 + 1e-10))
  gathered at the drawn tokens, summed over the newly revealed positions: its 'changed_only'
  `logprob_mode`), real = the data (`x0_real = input_ids`), both corrupted at tau
  (`_corrupt_with_mask_ratio`: masked where u < 1 - alpha_tau); the discriminator loss
  (BCE with logits against 1 - s (real) and s (fake), masked means, (real + fake) / 2), its
  gradients clipped at norm `gradient_clip_val` (1.0), then the student's: the reward
  (`_get_rewards`: log-odds log(sigmoid(d) + 1e-6) - log(1 - sigmoid(d) + 1e-6) clipped at
  +-8, masked mean, grouped z-score with torch's std and eps 1e-8, clamped at +-3), omega(tau)
  = clamp(-alpha'_tau / (1 - alpha_tau), 0.1, 10), L = -mean(omega A log q) + kl_beta (kl_hi
  KL_1 + kl_lo KL_2) - entropy_beta (H_1 + H_2) / 2 (`_get_regularization`), student
  gradients clipped at 0.5 x `gradient_clip_val`, AdamW, then the EMA (`update_ema`: lerp
  1 - ema_beta).

Where this library departs from the reference (documented in `didistill/distill/discrete/
didi.py` and `docs/text_scale.md`), the transcription follows the library so that the two
compute the same loss values on the same draws (the work per step is the same):
- a fresh student trajectory for the discriminator update and another for the student update
  (the reference reuses one); so one more no-grad trajectory per step than the reference;
- the last step goes to t = 0 (the reference stops at t0_eps = 1e-3, where a token stays
  masked with probability ~1e-3);
- KL and entropy of the SUBS laws over the V real tokens (the reference's KL compares the
  student's smoothed SUBS law with the teacher's *raw* softmax, [MASK] column included);
- the reward uses the clipped logit's log-odds as the reference (equal to the clipped logit
  up to ~1e-6 e^|d|); omega from the exact derivative (the reference's finite difference of
  step 1e-4 is exact for the linear log-linear alpha_t, up to float32 rounding);
- no nan_to_num of gradients (all finite here); one student forward per trajectory step (the
  reference's `_get_ancestral_update` evaluates the student twice per step: once without
  gradient for the draw and once with it).
All random numbers (tau, the Gumbel noise of each step, the corruption uniforms) are passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.peer_torch import mdlm


class Discriminator(torch.nn.Module):
    """tokens [B, L] -> per-token logits [B, L]: the teacher's trunk (`mdlm.DIT.trunk`, only
    the last `trainable_blocks` blocks trainable) and the spectral-norm head."""

    def __init__(self, trunk: mdlm.DIT, trainable_blocks: int):
        super().__init__()
        self.trunk = trunk
        width = trunk.vocab_embed.embedding.shape[1]
        for p in trunk.parameters():
            p.requires_grad_(False)
        for block in list(trunk.blocks)[len(trunk.blocks) - trainable_blocks :]:
            for p in block.parameters():
                p.requires_grad_(True)
        sn = torch.nn.utils.spectral_norm
        self.head = torch.nn.Sequential(
            sn(torch.nn.Linear(width, width)), torch.nn.SiLU(), sn(torch.nn.Linear(width, 1))
        )

    def forward(self, tokens):
        return self.head(self.trunk.trunk(tokens)[0])[..., 0]


def discriminator_from_flax(teacher_params, disc, stats, num_heads: int) -> Discriminator:
    """A `Discriminator` with our `DiDiState` discriminator: the teacher's params with
    `disc['blocks']` in place, `disc['head']` (TokenHead, spectral norm, no LayerNorm) and the
    power-iteration vectors `stats` (flax u [1, out] -> torch `weight_u` [out])."""
    import numpy as np

    params = {"params": dict(teacher_params["params"], **disc["blocks"])}
    k = len(disc["blocks"])
    module = Discriminator(mdlm.from_flax(params, num_heads), k)
    head = disc["head"]["params"]
    with torch.no_grad():
        for i, name in ((0, "hidden"), (2, "out")):
            layer = module.head[i]
            layer.weight_orig.copy_(torch.from_numpy(np.asarray(head[name]["kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(head[name]["bias"])))
            u = np.asarray(stats[f"sn_{name}"][f"{name}/kernel/u"])[0]
            layer.weight_u.copy_(torch.from_numpy(u.copy()))
    return module.train()


def _masked_mean(values, mask):
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum() + 1e-8)


class DiDiStep:
    """One discriminator update, then one student update (see the module docstring).

    `student`, `teacher`: `mdlm.DIT`; `discriminator`: `Discriminator`. `__call__(real, noise)`
    with real [B, L] int64 tokens (each data row repeated G times) and `noise` the draws:
    critic_tau / student_tau [B], critic_gumbel / student_gumbel (two [B, L, V + 1] each),
    critic_u_real, critic_u_fake, student_u [B, L]. Returns (discriminator loss, pg loss, KL,
    entropy, student loss) as 0-d tensors.
    """

    def __init__(self, student, teacher, discriminator, *, group_size=4, lr_student=3e-4,
                 lr_disc=1e-5, clip=1.0, ema_decay=0.999, label_smoothing=0.1,
                 kl_coef=0.01, entropy_beta=5e-4, reward_clip=8.0, advantage_clip=3.0,
                 sched_eps=1e-3, compile_nets=False):  # fmt: skip
        self.student_module, self.g = student, group_size
        self.clip, self.decay, self.s = clip, ema_decay, label_smoothing
        self.kl_coef, self.entropy_beta = kl_coef, entropy_beta
        self.reward_clip, self.advantage_clip, self.eps = reward_clip, advantage_clip, sched_eps
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.disc_params = [p for p in discriminator.parameters() if p.requires_grad]
        self.opt_s = torch.optim.AdamW(student.parameters(), lr_student, weight_decay=0.0)
        self.opt_d = torch.optim.AdamW(self.disc_params, lr_disc, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in student.parameters()]
        wrap = torch.compile if compile_nets else (lambda m: m)
        self.student, self.teacher, self.discriminator = map(
            wrap, (student, teacher, discriminator)
        )
        self.mask_id = student.output_layer.linear.out_features - 1

    def mask_prob(self, t):  # 1 - alpha_t of the log-linear schedule
        return (1 - self.eps) * t

    def backward_step(self, z, t, s, gumbel):
        """z_t -> z_s: (z_s, log-prob of the revealed tokens [B], raw logits [B, L, V + 1])."""
        logits = self.student(z)
        p_x0 = mdlm.subs_log_probs(logits, z).exp()
        with torch.no_grad():
            mt, ms = self.mask_prob(t)[:, None, None], self.mask_prob(s)[:, None, None]
            q = p_x0 * (mt - ms)
            q[:, :, self.mask_id] = ms[:, :, 0]
            draw = torch.argmax(torch.log(q) + gumbel, dim=-1)
        is_mask = z == self.mask_id
        z_next = torch.where(is_mask, draw, z)
        log_probs = F.log_softmax(torch.log(p_x0 + 1e-10), dim=-1)
        lp = torch.gather(log_probs, 2, z_next[..., None])[..., 0]
        revealed = is_mask & (z_next != self.mask_id)
        return z_next, (lp * revealed).sum(-1), logits

    def trajectory(self, tau, gumbels):
        """m -> z_tau -> x: (x, log q [B], [(z, t, raw logits)] per step)."""
        b = tau.shape[0]
        z = torch.full((b, gumbels[0].shape[1]), self.mask_id, dtype=torch.long)
        times = [torch.ones(b), tau, torch.zeros(b)]
        log_q, steps = torch.zeros(b), []
        for i in range(2):
            z_next, lp, logits = self.backward_step(z, times[i], times[i + 1], gumbels[i])
            steps.append((z, logits))
            log_q, z = log_q + lp, z_next
        return z, log_q, steps

    def corrupt(self, x, t, u):
        return torch.where(u < self.mask_prob(t)[:, None], self.mask_id, x)

    def critic_update(self, real, tau, gumbels, u_real, u_fake):
        with torch.no_grad():
            fake, _, _ = self.trajectory(tau, gumbels)
        z_real, z_fake = self.corrupt(real, tau, u_real), self.corrupt(fake, tau, u_fake)
        real_logits, fake_logits = self.discriminator(z_real), self.discriminator(z_fake)
        bce = F.binary_cross_entropy_with_logits
        loss_r = bce(real_logits, torch.full_like(real_logits, 1 - self.s), reduction="none")
        loss_f = bce(fake_logits, torch.full_like(fake_logits, self.s), reduction="none")
        loss = (_masked_mean(loss_r, z_real == self.mask_id)
                + _masked_mean(loss_f, z_fake == self.mask_id)) / 2  # fmt: skip
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.disc_params, self.clip)
        self.opt_d.step()
        return loss.detach()

    @torch.no_grad()
    def rewards(self, z, mask):
        p = torch.sigmoid(self.discriminator(z))
        log_odds = torch.log(p + 1e-6) - torch.log(1 - p + 1e-6)
        log_odds = log_odds.clamp(-self.reward_clip, self.reward_clip)
        reward = log_odds.masked_fill(~mask, 0).sum(-1) / (mask.sum(-1) + 1e-8)
        groups = reward.view(-1, self.g)
        adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-8)
        return adv.clamp(-self.advantage_clip, self.advantage_clip).view(-1)

    def student_update(self, tau, gumbels, u):
        x, log_q, steps = self.trajectory(tau, gumbels)
        z = self.corrupt(x, tau, u)
        adv = self.rewards(z, z == self.mask_id)
        omega = ((1 - self.eps) / self.mask_prob(tau)).clamp(0.1, 10.0)
        pg = -(omega * adv * log_q).mean()
        kl, ent = torch.zeros(()), torch.zeros(())
        for (z_step, logits), t in zip(steps, (torch.ones_like(tau), tau), strict=True):
            del t  # the DiT is time-agnostic (sigma 0)
            with torch.no_grad():
                teacher_logits = self.teacher(z_step)
            mask = z_step == self.mask_id
            log_s = F.log_softmax(logits[..., :-1], dim=-1)
            log_t = F.log_softmax(teacher_logits[..., :-1], dim=-1)
            kl = kl + self.kl_coef * _masked_mean((log_t.exp() * (log_t - log_s)).sum(-1), mask)
            ent = ent + _masked_mean(-(log_s.exp() * log_s).sum(-1), mask) / len(steps)
        loss = pg + kl - self.entropy_beta * ent
        self.opt_s.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student_module.parameters(), 0.5 * self.clip)
        self.opt_s.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.student_module.parameters()), 1 - self.decay)
        return pg.detach(), (kl / self.kl_coef).detach(), ent.detach(), loss.detach()

    def __call__(self, real, noise):
        loss_d = self.critic_update(
            real, noise["critic_tau"], noise["critic_gumbel"], noise["critic_u_real"],
            noise["critic_u_fake"],
        )  # fmt: skip
        pg, kl, ent, loss = self.student_update(
            noise["student_tau"], noise["student_gumbel"], noise["student_u"]
        )
        return loss_d, pg, kl, ent, loss


__all__ = ["DiDiStep", "Discriminator", "discriminator_from_flax"]
