"""MDLM's text DiT (DDiT), its SUBS loss and its caching sampler step, in plain PyTorch.

Transcribed (facts, not code) from kuleshov-group/mdlm @ c112c526d193436838c98d81455ee51f90309470:
- `models/dit.py`: `Rotary` 81-104 and flash-attn's non-interleaved rotation (pairs
  (x_i, x_{i + d/2}) of q and k turned by m base^(-2i/d); v untouched), `LayerNorm` 126-134
  (float32, a scale, no bias, eps 1e-5), `TimestepEmbedder` 150-189 (256-dim [cos, sin] of
  sigma, Linear -> SiLU -> Linear), `DDiTBlock` 214-289 (adaLN (shift, scale, gate) x 2 from
  Linear(silu(c)); q/k/v and output projections without bias; MLP with biases and tanh GELU;
  `qkv` laid out 'b s (three h d)'), `EmbeddingLayer` 292-299, `DDitFinalLayer` 302-321,
  `DIT` 324-370. Attention: MDLM calls flash-attn's varlen kernel (CUDA only); here
  `F.scaled_dot_product_attention` (non-causal), PyTorch's fused attention on CPU.
- `diffusion.py`: `_subs_parameterization` 261-281 (the [MASK] logit minus 1e6, log-softmax,
  unmasked positions carried over: 0 on the observed token, -1e6 elsewhere), `_process_sigma`
  301-310 (sigma = 0 without time conditioning), `_forward_pass_diffusion` 847-894
  (continuous-time SUBS: loss = -log p_theta(x0 | x_t) dsigma / expm1(sigma) with the
  log-linear noise sigma(t) = -log(1 - (1 - eps) t), dsigma = (1 - eps) / (1 - (1 - eps) t);
  x_t masks each token with probability 1 - exp(-sigma) = (1 - eps) t), `_loss` 896-917
  (sum over tokens / number of tokens), `_ddpm_caching_update` 592-611 (one reverse step,
  the denoiser re-evaluated only when the previous step changed a token).
Dropout: off (0) on both sides, so that the losses can be compared exactly; MDLM trains with
0.1. The sampler step here uses our schedule's mask probabilities (1 - eps) t (MDLM's
caching update uses t itself) and Gumbel-max draws from noise passed in, so that our sampler and
this one draw the same tokens; the work per step is MDLM's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

NEG_INF = -1000000.0  # MDLM's self.neg_infinity


class LayerNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x.float(), x.shape[-1:]) * self.weight


def rotate(x, cos, sin):  # x [B, L, H, d]; cos, sin [L, d/2]
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class DDiTBlock(torch.nn.Module):
    def __init__(self, dim, heads, cond_dim, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = torch.nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, mlp_ratio * dim),
            torch.nn.GELU(approximate="tanh"),
            torch.nn.Linear(mlp_ratio * dim, dim),
        )
        self.adaLN_modulation = torch.nn.Linear(cond_dim, 6 * dim)

    def forward(self, x, cos, sin, c):  # x [B, L, D], c [B, C] (after SiLU)
        b, length, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(
            6, dim=2
        )
        h = self.norm1(x) * (1 + scale1) + shift1
        qkv = self.attn_qkv(h).reshape(b, length, 3, self.heads, dim // self.heads)
        q, k, v = rotate(qkv[:, :, 0], cos, sin), rotate(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate1 * self.attn_out(a.transpose(1, 2).reshape(b, length, dim))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class DIT(torch.nn.Module):
    """tokens [B, L] (ids 0..V, V = [MASK]) -> logits [B, L, V + 1], time-agnostic (sigma 0)."""

    def __init__(self, vocab_size, width, depth, heads, cond_dim=128, mlp_ratio=4):
        super().__init__()
        self.vocab_embed = torch.nn.Module()
        self.vocab_embed.embedding = torch.nn.Parameter(torch.zeros(vocab_size + 1, width))
        self.sigma_map = torch.nn.Module()
        self.sigma_map.mlp = torch.nn.Sequential(
            torch.nn.Linear(256, cond_dim), torch.nn.SiLU(), torch.nn.Linear(cond_dim, cond_dim)
        )
        self.blocks = torch.nn.ModuleList(
            DDiTBlock(width, heads, cond_dim, mlp_ratio) for _ in range(depth)
        )
        self.output_layer = torch.nn.Module()
        self.output_layer.norm_final = LayerNorm(width)
        self.output_layer.linear = torch.nn.Linear(width, vocab_size + 1)
        self.output_layer.adaLN_modulation = torch.nn.Linear(cond_dim, 2 * width)
        head_dim = width // heads
        self.register_buffer(
            "inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        )

    def forward(self, tokens):
        x, c = self.trunk(tokens)
        out = self.output_layer
        shift, scale = out.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return out.linear(out.norm_final(x) * (1 + scale) + shift)

    def trunk(self, tokens):
        """(the last block's output [B, L, D], the conditioning c [B, C] after SiLU)."""
        b, length = tokens.shape
        x = self.vocab_embed.embedding[tokens]
        sigma = torch.zeros(b)  # _process_sigma without time conditioning
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = sigma[:, None] * freqs[None]
        c = F.silu(self.sigma_map.mlp(torch.cat([args.cos(), args.sin()], dim=-1)))
        angles = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, cos, sin, c)
        return x, c


def subs_log_probs(logits, xt):
    """MDLM's `_subs_parameterization`: [B, L, V + 1] log-probabilities."""
    mask_id = logits.shape[-1] - 1
    logits = logits.clone()
    logits[:, :, mask_id] += NEG_INF
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = xt != mask_id
    logits[unmasked] = NEG_INF
    logits[unmasked, xt[unmasked]] = 0
    return logits


def subs_loss(model, x0, xt, t, eps=1e-3):
    """MDLM's continuous-time SUBS loss in nats per token, x0 / xt [B, L] int64, t [B]."""
    sigma = -torch.log1p(-(1 - eps) * t)
    dsigma = (1 - eps) / (1 - (1 - eps) * t)
    log_p = torch.gather(subs_log_probs(model(xt), xt), -1, x0[:, :, None])[..., 0]
    nll = -log_p * (dsigma / torch.expm1(sigma))[:, None]  # [B, L]
    return nll.sum() / nll.numel()


class TeacherStep:
    """One MDLM training step: SUBS loss, AdamW, global-norm clipping and the EMA update
    (MDLM: `optimizer_step` then `self.ema.update`). `__call__(x0, xt, t) -> loss`."""

    def __init__(
        self, model, learning_rate, b1, b2, eps, weight_decay, clip, ema_decay, compile_net=False
    ):
        self.model, self.clip, self.decay = model, clip, ema_decay
        self.forward = torch.compile(model) if compile_net else model
        self.opt = torch.optim.AdamW(model.parameters(), learning_rate, (b1, b2), eps, weight_decay)
        self.ema = [p.detach().clone() for p in model.parameters()]

    def __call__(self, x0, xt, t):
        loss = subs_loss(self.forward, x0, xt, t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.model.parameters()), 1 - self.decay)
        return loss.detach()


@torch.no_grad()
def sample(model, x, mask_probs, gumbel):
    """The caching ancestral sampler: x [B, L] all [MASK]; mask_probs [N + 1] descending from
    1 - alpha_1 to 0; gumbel(i) -> step i's Gumbel noise [B, L, V + 1]. Returns (tokens
    [B, L], NFE)."""
    mask_id, log_p, nfe = model.output_layer.linear.out_features - 1, None, 0
    for i in range(len(mask_probs) - 1):
        mt, ms = float(mask_probs[i]), float(mask_probs[i + 1])
        if log_p is None:
            log_p, nfe = subs_log_probs(model(x), x), nfe + 1
        logq = log_p + math.log(mt - ms)
        logq[:, :, mask_id] = math.log(ms) if ms > 0 else -math.inf
        draw = torch.argmax(logq + gumbel(i), dim=-1)
        new = torch.where(x == mask_id, draw, x)
        if not torch.equal(new, x):
            log_p = None
        x = new
    return x, nfe


def from_flax(params, num_heads: int) -> DIT:
    """A `DIT` with the weights of our `DiT(layout='mdlm')` params (the inverse of
    `didistill.nets.convert_mdlm.mdlm_to_params`), strict load."""
    p = params["params"]
    table = np.asarray(p["embedding"])
    width, depth = table.shape[1], sum(k.startswith("block") for k in p)
    cond_dim = np.asarray(p["time_out"]["kernel"]).shape[0]
    mlp_ratio = np.asarray(p["block0"]["mlp_in"]["kernel"]).shape[1] // width
    model = DIT(table.shape[0] - 1, width, depth, num_heads, cond_dim, mlp_ratio)
    state = {"vocab_embed.embedding": table}

    def dense(name, leaf):
        state[f"{name}.weight"] = np.asarray(leaf["kernel"]).T
        state[f"{name}.bias"] = np.asarray(leaf["bias"])

    dense("sigma_map.mlp.0", p["time_in"])
    dense("sigma_map.mlp.2", p["time_out"])
    dense("output_layer.linear", p["logits"])
    dense("output_layer.adaLN_modulation", p["adaln_final"])
    state["output_layer.norm_final.weight"] = np.asarray(p["ln_final"]["scale"])
    for i in range(depth):
        b, q = f"blocks.{i}", p[f"block{i}"]
        state[f"{b}.norm1.weight"] = np.asarray(q["ln_attn"]["scale"])
        state[f"{b}.norm2.weight"] = np.asarray(q["ln_mlp"]["scale"])
        state[f"{b}.attn_qkv.weight"] = np.asarray(q["qkv"]["kernel"]).reshape(width, -1).T
        state[f"{b}.attn_out.weight"] = np.asarray(q["out"]["kernel"]).reshape(-1, width).T
        dense(f"{b}.mlp.0", q["mlp_in"])
        dense(f"{b}.mlp.2", q["mlp_out"])
        dense(f"{b}.adaLN_modulation", q["adaln"])
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
    state["inv_freq"] = model.inv_freq
    model.load_state_dict(state, strict=True)
    return model


__all__ = ["DIT", "TeacherStep", "from_flax", "sample", "subs_log_probs", "subs_loss"]
