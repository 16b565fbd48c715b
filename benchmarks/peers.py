"""Speed side by side with the PyTorch reference implementations (issue 21), on one machine.

    python -m benchmarks.peers [--tiny | --published] [--only=dmd,dmd_gan,mdlm,didi,sampling]
                               [--repeats=N] [--torch_compile] [--json=out.json] [size flags]

Needs the optional extra `peers` (`pip install -e '.[peers]'`, torch). Each line times the same
work done by this library (jitted JAX) and by a plain-PyTorch transcription of the reference
(`benchmarks/peer_torch/`, citing repository, commit and lines), from the same weights
(ours, exported to the reference's state-dict names), the same inputs and the same noise
(drawn once in NumPy / JAX and given to both), in float32 on both sides:

  dmd       one FastGen DMD2 engine step without its GAN branch on EDM's DDPM++ U-Net
            (`configs/cifar10_distill.py:dmd2` optimisers): `critic_steps` fake-score updates
            (x0-MSE at Karras-index noise) + one generator update (VSD loss, AdamW, clip 10).
            Ours: the library's `UNetDenoiser`, `one_step.losses.fake_score_loss`,
            `f_distill_generator_loss` (reverse KL, DMD time weight), `train.optim`;
            reference: `peer_torch.fastgen_dmd` on `peer_torch.edm_unet`.
  dmd_gan   the same step with DMD2's GAN branch: FastGen's `Discriminator_EDM` heads on the
            teacher's encoder features at every level (32/16/8 at 32x32), trained with the
            fake score in each critic update (logistic loss, real images noised at their own
            sigma), and the generator's GAN term (weight 1e-3). Ours: `nets.unet.LogitHeads`
            on `net.apply(..., features=True)` (as `one_step.images`' `disc_logit`),
            `losses.discriminator_loss` / `generator_gan_loss`, the joint critic gradient of
            `one_step.method`; reference: `peer_torch.fastgen_dmd.DiscriminatorEDM`.
  mdlm      one MDLM teacher step on the DiT (layout 'mdlm'): SUBS continuous-time loss at
            given t and masks, AdamW, clip 1, EMA 0.9999. Ours: `nets.dit.DiT`,
            `diffusion.masked.subs_log_probs` / `nelbo_from_log_probs`; reference:
            `peer_torch.mdlm` (kuleshov-group/mdlm's DIT and `_forward_pass_diffusion`).
  didi      one DiDi-Instruct step (`configs/owt_didi.py` settings, constant learning rates):
            one discriminator update and one student update on the same DiT, batch
            text_batch x 4. Ours: the library's own jitted `DiDiInstruct.step`; reference:
            `peer_torch.didi_instruct` (the authors' `training_step`); the reference side is
            given the step's random draws, re-drawn from the same JAX keys (`didi_noise`).
  sampling  images/s of the 1-step and 4-step image students (`one_step.few_step.sample`,
            renoising noise shared) and tokens/s of the cached MDLM ancestral sampler
            (`diffusion.masked.ancestral_sample`; the same Gumbel noise for the check).

Sizes: the default setting is CPU-sized (DDPM++ at 32 channels, 1 block per level; the DiT at
MDLM's width, length 64); `--published` sets EDM's CIFAR-10 DDPM++ (128 channels, channel_mult
(2, 2, 2), 4 blocks, attention at 16) and MDLM's OpenWebText DiT (12 x 768, vocab 50,257),
batches and the DiT length staying CPU-sized; each size flag overrides either.

Per line: steps/s (or samples/s) of both, the ratio ours / reference, compile time apart
(JAX: lower + compile; torch.compile: its first call minus a median step), peak memory of both
as the peak resident-set-size increase over the timed calls (RSS read from /proc every 5 ms
by a thread, relative to the RSS just before that side's first call; JAX also gives
`memory_analysis()` temp bytes), and the loss values of both with their difference. Timing:
one warm-up call (whose losses are the ones compared: both sides start from the same state),
then `--repeats` calls, median. torch uses as many threads as XLA (the CPUs this process may
run on: `os.sched_getaffinity`); both run in this process, JAX first. `--torch_compile` also
times every line's reference under `torch.compile` (inductor), with its own loss check.

Equal work: the fake-score, discriminator, GAN, MDLM and DiDi-Instruct losses are the same
quantity on both sides. Our DMD generator loss is a surrogate with FastGen's gradient but
another value (`divergences.score_difference_loss`), so the dmd lines compare FastGen's VSD
value computed from our step's x0, D_phi and D_psi, and the updates themselves
(|dtheta_ours - dtheta_ref| / |dtheta_ours| over all parameters: the generator, and the
discriminator on the dmd_gan line). Dropout is off on both sides (for exact losses).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from didistill import xla_cpu  # noqa: F401  (before the first computation: XLA:CPU flags)

PARTS = ("dmd", "dmd_gan", "mdlm", "didi", "sampling")
SIGMA_G = 80.0  # the generator's input noise level (FastGen / DMD2, cifar10_distill)
TINY = dict(
    channels=8, blocks=1, levels=1, resolution=8, batch=2, critic_steps=1, dit_width=32,
    dit_depth=1, dit_heads=2, vocab=63, length=16, text_batch=2, sample_batch=2, text_steps=4,
    repeats=2,
)  # fmt: skip
DEFAULT = dict(  # CPU-sized; the published CIFAR-10 U-Net is channels 128, blocks 4, batch 2048
    channels=32, blocks=1, levels=3, resolution=32, batch=4, critic_steps=1, dit_width=768,
    dit_depth=12, dit_heads=12, vocab=50257, length=64, text_batch=2, sample_batch=16,
    text_steps=8, repeats=3,
)  # fmt: skip
PUBLISHED = dict(  # --published: EDM's CIFAR-10 DDPM++ and MDLM's OpenWebText DiT widths
    channels=128,
    blocks=4,
    levels=3,
    resolution=32,
    dit_width=768,
    dit_depth=12,
    dit_heads=12,
    vocab=50257,
)  # fmt: skip  (batches and the DiT length stay CPU-sized: published 2048 / 512 x 1,024)
REPORT_FIELDS = (
    "name", "settings", "ours_steps_per_s", "ref_steps_per_s", "ratio", "ours_compile_s",
    "ours_peak_rss_mib", "ref_peak_rss_mib", "ours_loss", "ref_loss", "loss_abs_diff",
)  # fmt: skip


# --------------------------------------------------------------------------- measuring


class PeakRSS:
    """Peak resident set size increase (bytes) while the block runs, sampled every 5 ms."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base, self.peak, self.stop = self.rss(), 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.delta = self.peak - self.base


def time_calls(call, repeats: int, block=lambda out: out, after_first=None):
    """(first call's output, first call s, median s of `repeats` further calls, peak RSS delta);
    `after_first()` runs after the first call, outside the timings."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        first = block(call())
        first_s = time.perf_counter() - start
        if after_first is not None:
            after_first()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            block(call())
            times.append(time.perf_counter() - start)
    return first, first_s, statistics.median(times), mem.delta


def _mib(n) -> float:
    return n / 2**20


def _step_row(name, settings, j_med, j_first, compile_s, temp, j_mem, rows) -> dict:
    """The timing and memory fields of one step line: ours (jitted: median seconds `j_med`,
    first call, compile, XLA temp size, RSS increase) against the reference's `rows['eager']`
    (and `rows['compile']` when torch.compile ran)."""
    eager = rows["eager"]
    row = dict(
        name=name,
        settings=settings,
        ours_steps_per_s=1 / j_med,
        ref_steps_per_s=1 / eager["med"],
        ratio=eager["med"] / j_med,
        ours_compile_s=compile_s,
        ours_first_call_s=j_first,
        ours_temp_mib=_mib(getattr(temp, "temp_size_in_bytes", 0)) if temp else None,
        ours_peak_rss_mib=_mib(j_mem),
        ref_peak_rss_mib=_mib(eager["mem"]),
    )
    if "compile" in rows:
        c = rows["compile"]
        row.update(
            ref_compiled_steps_per_s=1 / c["med"],
            ref_compiled_compile_s=c["first"] - c["med"],
            ratio_vs_compiled=c["med"] / j_med,
            ref_compiled_peak_rss_mib=_mib(c["mem"]),
        )
    return row


def _torch():
    try:
        import torch
    except ImportError as err:
        raise SystemExit(
            f"benchmarks.peers needs PyTorch ({err}); install the extra: pip install -e '.[peers]'"
        ) from err
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return torch


def random_params(shapes, seed: int):
    """Random weights for a tree of shapes (`jax.eval_shape` of an init, so nothing compiles):
    kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.05^2), everything else N(0, 0.05^2). Every
    layer is live (the zero-initialised output layers too), so the compared losses and
    gradients depend on all of them."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "kernel" in name or "embedding" in name:
            fan_in = int(np.prod(leaf.shape[:-1])) if "kernel" in name else 1
            return jnp.asarray(noise / np.sqrt(fan_in))
        if "scale" in name:
            return jnp.asarray(1.0 + 0.05 * noise)
        return jnp.asarray(0.05 * noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# --------------------------------------------------------------------------- DMD step


def unet_config(s) -> dict:
    """EDM's CIFAR-10 DDPM++ (`convert_edm.PRESETS['edm-cifar10-cond']`) at a chosen width."""
    from didistill.nets.convert_edm import PRESETS

    cfg = dict(PRESETS["edm-cifar10-cond"])
    cfg.update(model_channels=s["channels"], num_blocks=s["blocks"], img_resolution=s["resolution"])
    cfg["channel_mult"] = [2] * s["levels"]  # EDM: (2, 2, 2)
    res = s["resolution"]
    cfg["attn_resolutions"] = [res // 2 if s["levels"] > 1 else res]  # 16 at 32x32, as EDM
    return cfg


def dmd_inputs(s, shape, label_dim, seed=0, real=False) -> dict:
    """NumPy noise of one step: critic_* [K, B, ...] and gen_* [B, ...] (NHWC images); with
    `real` also the discriminator's real images critic_real [K, B, ...] (uniform in [-1, 1]),
    their noise levels critic_real_sigma [K, B] and noise critic_real_eps."""
    from didistill.distill.one_step.noise import karras_grid_ascending

    rng = np.random.default_rng(seed)
    k, b = s["critic_steps"], s["batch"]
    grid = karras_grid_ascending(1000, 0.002, 80.0).astype(np.float32)

    def draw(*lead):
        return dict(
            z=rng.standard_normal((*lead, *shape), np.float32),
            eps=rng.standard_normal((*lead, *shape), np.float32),
            sigma=grid[rng.integers(2, 999, lead)],  # FastGen: indices [2, 998]
            y=rng.integers(0, label_dim, lead),
        )

    critic, gen = draw(k, b), draw(b)
    out = {f"critic_{n}": v for n, v in critic.items()}
    out.update({f"gen_{n}": v for n, v in gen.items()})
    if real:
        k, b = s["critic_steps"], s["batch"]
        out["critic_real"] = rng.uniform(-1, 1, (k, b, *shape)).astype(np.float32)
        out["critic_real_sigma"] = grid[rng.integers(2, 999, (k, b))]
        out["critic_real_eps"] = rng.standard_normal((k, b, *shape), np.float32)
    return out


def jax_dmd_step(net, critic_steps, head=None, resolutions=()):
    """This library's step (see the module docstring); returns jit-able step(state, teacher,
    inputs) -> (state, losses) and the optimisers (generator, fake score, discriminator).

    state = (g, g_opt, f, f_opt) or, with a discriminator `head` (`nets.unet.LogitHeads` on the
    teacher's encoder features at `resolutions`: `one_step.images`' `disc_logit`), (g, g_opt,
    f, f_opt, d, d_opt). losses = (fake-score losses [K], surrogate, VSD value) or (fake-score
    losses [K], discriminator losses [K], surrogate, VSD value, generator GAN loss). As in
    `one_step.method`: each critic update differentiates fake-score + discriminator loss
    jointly and applies both optimisers; the generator adds `gan_weight` x the GAN term."""
    from didistill import divergences
    from didistill.configs import cifar10_distill
    from didistill.distill.one_step import losses
    from didistill.train.optim import apply_gradients, make_optimizer

    config = cifar10_distill.get_config("dmd2")
    opt_g, opt_f = make_optimizer(config.optim_generator), make_optimizer(config.optim_fake_score)
    opt_d = make_optimizer(config.optim_discriminator)
    gan_weight = float(config.distill.gan_weight)  # 1e-3, FastGen's gan_loss_weight_gen
    reverse_kl = divergences.get("reverse_kl")
    sg = jax.lax.stop_gradient

    def gen(params, z, y):
        return net.apply(params, SIGMA_G * z, jnp.full((z.shape[0],), SIGMA_G), y)

    def noised(x0, sigma, eps):
        return x0 + sigma[:, None, None, None] * eps

    def disc_logit(d, teacher, x, sigma, y):  # one_step.images.build's disc_logit
        _, feats = net.apply(teacher, x, sigma, y, features=True)
        return head.apply(d, {r: feats[r] for r in resolutions})

    def step(state, teacher, inp):
        g, g_opt, f, f_opt, *disc = state
        d, d_opt = disc if head is not None else (None, None)
        fake_losses, disc_losses = [], []
        for i in range(critic_steps):  # a Python loop, as one_step.method
            y, sigma = inp["critic_y"][i], inp["critic_sigma"][i]
            x0 = sg(gen(g, inp["critic_z"][i], y))
            xt = noised(x0, sigma, inp["critic_eps"][i])

            def critic_loss(params, xt=xt, x0=x0, sigma=sigma, y=y, i=i):
                out = net.apply(params[0], xt, sigma, y)
                f_loss = losses.fake_score_loss(out, x0, sigma, net.sigma_data, "none")
                if head is None:
                    return f_loss, (f_loss, jnp.zeros(()))
                real_sigma = inp["critic_real_sigma"][i]
                real_t = noised(inp["critic_real"][i], real_sigma, inp["critic_real_eps"][i])
                logit_real = disc_logit(params[1], teacher, real_t, real_sigma, y)
                logit_fake = disc_logit(params[1], teacher, xt, sigma, y)
                d_loss = losses.discriminator_loss(logit_real, logit_fake)
                return f_loss + d_loss, (f_loss, d_loss)

            (_, (f_loss, d_loss)), (f_grads, d_grads) = jax.value_and_grad(
                critic_loss, has_aux=True
            )((f, d))
            f, f_opt = apply_gradients(opt_f, f, f_opt, f_grads)
            if head is not None:
                d, d_opt = apply_gradients(opt_d, d, d_opt, d_grads)
            fake_losses.append(f_loss)
            disc_losses.append(d_loss)

        def gen_loss(p):
            y, sigma = inp["gen_y"], inp["gen_sigma"]
            x0 = gen(p, inp["gen_z"], y)
            xt = noised(x0, sigma, inp["gen_eps"])
            d_teacher, d_fake = net.apply(teacher, xt, sigma, y), net.apply(f, xt, sigma, y)
            zero = jnp.zeros(x0.shape[0])
            loss = losses.f_distill_generator_loss(x0, d_teacher, d_fake, zero, reverse_kl)
            w = losses.dmd_normalizer(x0, d_teacher)[:, None, None, None]
            vsd = 0.5 * jnp.mean(((d_fake - d_teacher) * w) ** 2)  # FastGen's value
            gan = jnp.zeros(())
            if head is not None:
                gan = losses.generator_gan_loss(disc_logit(d, teacher, xt, sigma, y))
            return loss + gan_weight * gan, (loss, sg(vsd), gan)

        (_, (loss, vsd, gan)), grads = jax.value_and_grad(gen_loss, has_aux=True)(g)
        g, g_opt = apply_gradients(opt_g, g, g_opt, grads)
        if head is None:
            return (g, g_opt, f, f_opt), (jnp.stack(fake_losses), loss, vsd)
        out = (jnp.stack(fake_losses), jnp.stack(disc_losses), loss, vsd, gan)
        return (g, g_opt, f, f_opt, d, d_opt), out

    return step, opt_g, opt_f, opt_d


def feature_resolutions(s) -> list[int]:
    """The discriminator's feature resolutions: every U-Net level (FastGen's CIFAR-10
    `feature_indices={0, 1, 2}`: 32, 16, 8)."""
    return [s["resolution"] >> level for level in range(s["levels"])]


def _rel_gap(before: dict, ours: dict, ref: dict) -> float:
    """|dtheta_ours - dtheta_ref| / |dtheta_ours| over all named parameters."""
    num = den = 0.0
    for name, b in before.items():
        num += float(np.sum((np.asarray(ours[name]) - ref[name]) ** 2))
        den += float(np.sum((np.asarray(ours[name]) - b) ** 2))
    return float(np.sqrt(num / max(den, 1e-30)))


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


def bench_dmd(s, repeats, compile_torch, log, gan=False) -> dict:
    """The `dmd` line (FastGen's DMD2 step without its GAN branch) or, with `gan`, the
    `dmd_gan` line: the same step with FastGen's discriminator on the teacher's features."""
    torch = _torch()
    from benchmarks.peer_torch import edm_unet, fastgen_dmd
    from didistill.nets.convert_edm import export_state_dict, param_template, unet_from_config
    from didistill.nets.unet import LogitHeads

    tag = "dmd_gan" if gan else "dmd"
    cfg = unet_config(s)
    net, shape = unet_from_config(cfg)
    teacher = random_params(param_template(net, shape), seed=0)
    inputs = dmd_inputs(s, shape, net.label_dim, real=gan)
    res = feature_resolutions(s) if gan else []
    channels = s["channels"] * 2  # channel_mult 2 at every level
    head = LogitHeads(resolutions=tuple(res), width=0) if gan else None
    step, opt_g, opt_f, opt_d = jax_dmd_step(net, s["critic_steps"], head, tuple(res))
    disc = None
    if gan:
        feats = {r: jnp.zeros((1, r, r, channels)) for r in res}
        disc = random_params(jax.eval_shape(head.init, jax.random.key(0), feats), seed=4)

    def fresh_state():  # generator and fake score start from the teacher (own buffers)
        g, f = jax.tree.map(jnp.copy, teacher), jax.tree.map(jnp.copy, teacher)
        state = (g, opt_g.init(g), f, opt_f.init(f))
        if gan:
            d = jax.tree.map(jnp.copy, disc)
            state += (d, opt_d.init(d))
        return state

    state = fresh_state()
    jinp = {k: jnp.asarray(v) for k, v in inputs.items()}
    log(f"  {tag}: compiling our step ...")
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, teacher, jinp).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis()
    holder = {"state": state}

    def ours():
        holder["state"], out = compiled(holder["state"], teacher, jinp)
        return out

    log(f"  {tag}: timing ours ...")

    def keep_ours():  # generator (and discriminator) after one step, for the update comparison
        st = jax.device_get(holder["state"])
        holder["after"] = (st[0], st[4] if gan else None)

    j_out, j_first, j_med, j_mem = time_calls(ours, repeats, jax.block_until_ready, keep_ours)
    g_after, d_after = holder["after"]
    holder.clear()
    gc.collect()

    def tensors(arrays, images):
        out = {}
        for k, v in arrays.items():
            if k.endswith("_y"):
                v = np.eye(net.label_dim, dtype=np.float32)[v]
            elif images and v.ndim >= 4:
                v = np.moveaxis(v, -1, -3)  # NHWC -> NCHW
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        return out

    tinp = tensors(inputs, images=True)
    rows, gaps = {}, {}
    for mode in ("eager", "compile") if compile_torch else ("eager",):
        nets = [edm_unet.from_flax(cfg, teacher) for _ in range(3)]
        t_disc = fastgen_dmd.discriminator_from_flax(disc, res, channels) if gan else None
        ref = fastgen_dmd.DMDStep(*nets, sigma_g=SIGMA_G, compile_nets=mode == "compile",
                                  discriminator=t_disc)  # fmt: skip
        log(f"  {tag}: timing the reference ({mode}) ...")
        after = {}

        def keep_ref(nets=nets, t_disc=t_disc, after=after):
            after["g"] = {k: v.detach().numpy().copy() for k, v in nets[0].state_dict().items()}
            if t_disc is not None:
                after["d"] = [p.detach().numpy().copy() for p in t_disc.parameters()]

        t_out, t_first, t_med, t_mem = time_calls(lambda ref=ref: ref(tinp), repeats,
                                                  after_first=keep_ref)  # fmt: skip
        rows[mode] = dict(out=[np.asarray(v) for v in t_out], first=t_first, med=t_med,
                          mem=t_mem)  # fmt: skip
        # the updates of one step: ours vs the reference
        gaps[mode] = {"generator": _rel_gap(export_state_dict(teacher),
                                            export_state_dict(g_after), after["g"])}  # fmt: skip
        if gan:  # the same parameters in both orders (heads, then conv/GN/out per head)
            ref_disc = fastgen_dmd.discriminator_from_flax(d_after, res, channels)
            init_disc = fastgen_dmd.discriminator_from_flax(disc, res, channels)
            names = [n for n, _ in ref_disc.named_parameters()]
            ours_d = {n: p.detach().numpy() for n, p in ref_disc.named_parameters()}
            init_d = {n: p.detach().numpy() for n, p in init_disc.named_parameters()}
            gaps[mode]["discriminator"] = _rel_gap(
                init_d, ours_d, dict(zip(names, after["d"], strict=True))
            )
        ref = nets = t_disc = None
        gc.collect()
    eager = rows["eager"]["out"]

    def losses_of(out):
        if gan:
            fake, d, vsd, gan_g = out[0], out[1], out[-2], out[-1]
            return dict(fake_score=[float(v) for v in np.ravel(fake)],
                        discriminator=[float(v) for v in np.ravel(d)], vsd=float(vsd),
                        gan_generator=float(gan_g))  # fmt: skip
        return dict(fake_score=[float(v) for v in np.ravel(out[0])], vsd=float(out[-1]))

    ours_loss = losses_of([np.asarray(v) for v in j_out])
    if gan:  # ours: (fake, disc, surrogate, vsd, gan); the reference: (fake, disc, vsd, gan)
        ours_loss = losses_of([np.asarray(j_out[0]), np.asarray(j_out[1]),
                               np.asarray(j_out[3]), np.asarray(j_out[4])])  # fmt: skip
    ref_loss = losses_of(eager)

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)

    settings = (
        f"DDPM++ {s['resolution']}x{s['resolution']}x3, model_channels {s['channels']}, "
        f"channel_mult {tuple(cfg['channel_mult'])}, {s['blocks']} blocks/level, attention at "
        f"{cfg['attn_resolutions']}, 10 classes; batch {s['batch']}, critic_steps "
        f"{s['critic_steps']}; float32"
    )
    if gan:
        settings += f"; discriminator heads at {res} ({channels} channels), GAN weight 1e-3"
    name = "dmd step + GAN (FastGen DMD2)" if gan else "dmd step (FastGen DMD2 without GAN)"
    row = _step_row(name, settings, j_med, j_first, compile_s, temp, j_mem, rows)
    row.update(ours_loss=ours_loss, ref_loss=ref_loss, loss_abs_diff=max_diff(ours_loss, ref_loss))
    row.update({f"{k}_update_rel_gap": v for k, v in gaps["eager"].items()})
    if "compile" in rows:
        row["ref_compiled_loss_abs_diff"] = max_diff(losses_of(rows["compile"]["out"]), ref_loss)
        row.update({f"ref_compiled_{k}_update_rel_gap": v for k, v in gaps["compile"].items()})
    return row


# --------------------------------------------------------------------------- MDLM step


def dit_setup(s):
    from didistill.nets.dit import DiT

    net = DiT(
        vocab_size=s["vocab"], max_length=s["length"], width=s["dit_width"],
        depth=s["dit_depth"], num_heads=s["dit_heads"], cond_dim=128, layout="mdlm",
        attention="xla",
    )  # fmt: skip
    tokens = jnp.zeros((1, s["length"]), jnp.int32)
    shapes = jax.eval_shape(net.init, jax.random.key(1), tokens, jnp.ones((1,)))
    return net, random_params(shapes, seed=1)


def text_inputs(s, seed=0):
    """x0 [B, L] tokens, t [B] (low-discrepancy as MDLM's antithetic sampling), x_t."""
    rng = np.random.default_rng(seed)
    b, length, v = s["text_batch"], s["length"], s["vocab"]
    x0 = rng.integers(0, v, (b, length))
    t = 1e-3 + (1 - 1e-3) * ((rng.random() + np.arange(b) / b) % 1.0)
    masked = rng.random((b, length)) < ((1 - 1e-3) * t)[:, None]
    xt = np.where(masked, v, x0)
    return x0.astype(np.int32), t.astype(np.float32), xt.astype(np.int32)


def bench_mdlm(s, repeats, compile_torch, log) -> dict:
    torch = _torch()
    from benchmarks.peer_torch import mdlm
    from didistill.configs import base
    from didistill.diffusion import masked
    from didistill.train.optim import apply_gradients, ema_update, make_optimizer

    net, variables = dit_setup(s)
    optim = dict(learning_rate=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    opt = make_optimizer(base.optimizer(name="adamw", grad_clip_norm=1.0, **optim))
    schedule = masked.get_schedule("loglinear", 1e-3)
    decay = 0.9999
    x0, t, xt = text_inputs(s)

    def step(state, x0, xt, t):
        params, opt_state, ema = state

        def loss_fn(p):
            log_probs = masked.subs_log_probs(net.apply(p, xt, t), xt)
            per_seq = masked.nelbo_from_log_probs(log_probs, x0, xt, t, schedule)
            return jnp.mean(per_seq) / x0.shape[1]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        params, opt_state = apply_gradients(opt, params, opt_state, grads)
        return (params, opt_state, ema_update(ema, params, decay)), loss

    copy = lambda: jax.tree.map(jnp.copy, variables)  # noqa: E731  (donated: own buffers)
    state = (copy(), opt.init(variables), copy())
    args = tuple(jnp.asarray(a) for a in (x0, xt, t))
    log("  mdlm: compiling our step ...")
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, *args).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis()
    holder = {"state": state}

    def ours():
        holder["state"], loss = compiled(holder["state"], *args)
        return loss

    log("  mdlm: timing ours ...")
    j_loss, j_first, j_med, j_mem = time_calls(ours, repeats, jax.block_until_ready)
    holder.clear()
    gc.collect()
    tx0, txt = torch.from_numpy(x0.astype(np.int64)), torch.from_numpy(xt.astype(np.int64))
    tt = torch.from_numpy(t)
    rows = {}
    for mode in ("eager", "compile") if compile_torch else ("eager",):
        model = mdlm.from_flax(variables, s["dit_heads"])
        ref = mdlm.TeacherStep(model, **optim, clip=1.0, ema_decay=decay,
                               compile_net=mode == "compile")  # fmt: skip
        log(f"  mdlm: timing the reference ({mode}) ...")
        t_loss, t_first, t_med, t_mem = time_calls(lambda ref=ref: ref(tx0, txt, tt), repeats)
        rows[mode] = dict(loss=float(t_loss), first=t_first, med=t_med, mem=t_mem)
        ref = model = None
        gc.collect()
    eager = rows["eager"]
    settings = (
        f"DiT (MDLM layout) {s['dit_depth']} x {s['dit_width']}, {s['dit_heads']} heads, vocab "
        f"{s['vocab']}+[MASK], length {s['length']}, batch {s['text_batch']}; AdamW 3e-4, clip "
        "1, EMA; dropout 0; float32"
    )
    row = _step_row("mdlm teacher step", settings, j_med, j_first, compile_s, temp, j_mem, rows)
    row.update(
        ours_loss=float(j_loss),
        ref_loss=eager["loss"],
        loss_abs_diff=abs(float(j_loss) - eager["loss"]),
    )
    if "compile" in rows:
        row["ref_compiled_loss_abs_diff"] = abs(rows["compile"]["loss"] - eager["loss"])
    return row


# --------------------------------------------------------------------------- DiDi-Instruct step

DIDI_GROUP = 4  # samples per data row (the reference's num_samples_per_prompt)


def didi_setup(s):
    """(net, teacher params, the library's `DiDiInstruct` run, its initial state, data
    tokens [B, L]): configs/owt_didi.py's settings on the `mdlm` line's DiT, B = text_batch x 4
    (each data row repeated G = 4 times, as the reference), K = min(4, depth) trainable
    discriminator blocks, constant learning rates (no warm-up: the step is the same at every
    iteration), one critic update. The student starts from other random weights than the
    teacher (as mid-training; at the teacher's weights the KL term would be exactly 0)."""
    from didistill.configs import owt_didi
    from didistill.diffusion import masked
    from didistill.distill.discrete import didi, student

    net, teacher = dit_setup(s)
    b = s["text_batch"] * DIDI_GROUP
    config = owt_didi.get_config()
    config.data.length = s["length"]
    config.train.batch_size = b
    config.distill.update(disc_trainable_blocks=min(4, s["dit_depth"]), critic_steps=1)
    for opt in (config.optim_student, config.optim_discriminator):
        opt.update(schedule="warmup_constant", warmup_steps=0, weight_decay=0.0)
    schedule = masked.get_schedule("loglinear", 1e-3)
    scaffold = student.TextStudent(config, net, teacher, {}, None, schedule, None, None)
    run = didi.DiDiInstruct(config, scaffold)
    state = run.init(jax.random.key(5))
    # a student away from the teacher (as mid-training), so that the KL term is not 0
    moved = random_params(jax.eval_shape(lambda: teacher), seed=8)
    state = state.replace(student=moved, student_ema=moved)
    state = jax.tree.map(jnp.copy, state)  # own buffers (donated)
    rows = np.random.default_rng(6).integers(0, s["vocab"], (s["text_batch"], s["length"]))
    return net, teacher, run, state, np.repeat(rows, DIDI_GROUP, axis=0).astype(np.int32)


def didi_noise(run, key, b, length, vocab) -> dict:
    """The random draws of `run.step(state, batch, key, .)` with one critic update, taken from
    the same keys the step splits (see `DiDiInstruct.step`, `critic_loss_and_grad`,
    `student_objective`, `trajectory`): tau of both updates, the Gumbel noise of the two
    trajectory steps of each, and the corruption uniforms. NumPy arrays."""
    k_critic, k_student = jax.random.split(key)
    k_critic = jax.random.split(k_critic, 1)[0]
    _, k_fake, k_tau, _, k_mr, k_mf = jax.random.split(k_critic, 6)
    shape = (b, length, vocab + 1)

    def gumbels(k):
        return [np.asarray(jax.random.gumbel(k_i, shape)) for k_i in jax.random.split(k, 2)]

    out = dict(
        critic_tau=run.sample_tau(k_tau, b), critic_gumbel=gumbels(k_fake),
        critic_u_real=jax.random.uniform(k_mr, (b, length)),
        critic_u_fake=jax.random.uniform(k_mf, (b, length)),
    )  # fmt: skip
    k_tau, k_traj, _, k_mask = jax.random.split(k_student, 4)
    out.update(student_tau=run.sample_tau(k_tau, b), student_gumbel=gumbels(k_traj),
               student_u=jax.random.uniform(k_mask, (b, length)))  # fmt: skip
    return {k: v if isinstance(v, list) else np.asarray(v) for k, v in out.items()}


DIDI_LOSSES = ("discriminator_loss", "pg_loss", "kl_to_teacher", "entropy", "student_loss")


def bench_didi(s, repeats, compile_torch, log) -> dict:
    torch = _torch()
    from benchmarks.peer_torch import didi_instruct, mdlm

    net, teacher, run, state, tokens = didi_setup(s)
    b, length = tokens.shape
    key = jax.random.key(7)
    batch = {"tokens": jnp.asarray(tokens)[:, None, :]}  # [B, critic_steps, L]
    init = jax.device_get((state.student, state.discriminator, state.discriminator_stats))
    log("  didi: compiling our step ...")
    start = time.perf_counter()
    compiled = jax.jit(run.step, donate_argnums=0).lower(state, batch, key, 0).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis()
    holder = {"state": state}

    def ours():
        holder["state"], metrics = compiled(holder["state"], batch, key, 0)
        return {k: metrics[k] for k in DIDI_LOSSES}

    log("  didi: timing ours ...")
    j_out, j_first, j_med, j_mem = time_calls(ours, repeats, jax.block_until_ready)
    holder.clear()
    gc.collect()
    noise = didi_noise(run, key, b, length, s["vocab"])
    tnoise = {k: [torch.from_numpy(np.array(a)) for a in v] if isinstance(v, list)
              else torch.from_numpy(np.array(v)) for k, v in noise.items()}  # fmt: skip
    real = torch.from_numpy(tokens.astype(np.int64))
    rows = {}
    for mode in ("eager", "compile") if compile_torch else ("eager",):
        disc = didi_instruct.discriminator_from_flax(teacher, *init[1:], s["dit_heads"])
        ref = didi_instruct.DiDiStep(
            mdlm.from_flax(init[0], s["dit_heads"]), mdlm.from_flax(teacher, s["dit_heads"]),
            disc, group_size=DIDI_GROUP, compile_nets=mode == "compile",
        )  # fmt: skip
        log(f"  didi: timing the reference ({mode}) ...")
        t_out, t_first, t_med, t_mem = time_calls(lambda ref=ref: ref(real, tnoise), repeats)
        rows[mode] = dict(out=dict(zip(DIDI_LOSSES, map(float, t_out), strict=True)),
                          first=t_first, med=t_med, mem=t_mem)  # fmt: skip
        ref = disc = None
        gc.collect()
    ours_loss = {k: float(v) for k, v in j_out.items()}
    ref_loss = rows["eager"]["out"]
    settings = (
        f"the mdlm line's DiT ({s['dit_depth']} x {s['dit_width']}, vocab {s['vocab']}), "
        f"length {length}, batch {b} ({s['text_batch']} data rows x G={DIDI_GROUP}); "
        f"configs/owt_didi.py: two-step trajectories, discriminator = teacher with the last "
        f"{run.d.disc_trainable_blocks} blocks trainable + spectral-norm head, one critic "
        "update, AdamW 3e-4 / 1e-5 (constant), clip 0.5 / 1, KL 0.01, entropy 5e-4, EMA; float32"
    )
    row = _step_row("didi-instruct step", settings, j_med, j_first, compile_s, temp, j_mem, rows)
    row.update(ours_loss=ours_loss, ref_loss=ref_loss,
               loss_abs_diff=max(abs(ours_loss[k] - ref_loss[k]) for k in DIDI_LOSSES))  # fmt: skip
    if "compile" in rows:
        c = rows["compile"]["out"]
        row["ref_compiled_loss_abs_diff"] = max(abs(c[k] - ref_loss[k]) for k in DIDI_LOSSES)
    return row


# --------------------------------------------------------------------------- sampling


def bench_sampling(s, repeats, log, compile_torch=False) -> list[dict]:
    torch = _torch()
    from benchmarks.peer_torch import edm_unet, mdlm
    from didistill.diffusion import masked
    from didistill.distill.one_step import few_step
    from didistill.nets.convert_edm import param_template, unet_from_config

    rows = []
    cfg = unet_config(s)
    net, shape = unet_from_config(cfg)
    params = random_params(param_template(net, shape), seed=0)
    ref = edm_unet.from_flax(cfg, params)
    compiled_ref = torch.compile(ref) if compile_torch else None
    b = s["sample_batch"]
    rng = np.random.default_rng(2)
    z = rng.standard_normal((b, *shape), np.float32)
    y = rng.integers(0, net.label_dim, b)
    key = jax.random.key(3)
    tz = torch.from_numpy(np.ascontiguousarray(np.moveaxis(z, -1, 1)))
    ty = torch.from_numpy(np.eye(net.label_dim, dtype=np.float32)[y])

    def step(p, x, sigma, labels):
        return net.apply(p, x, sigma, labels)

    for k in (1, 4):
        sigmas = few_step.step_sigmas(SIGMA_G, k)
        ours = jax.jit(
            lambda p, z, y, key, sigmas=sigmas: few_step.sample(step, p, z, sigmas, key, y)
        )
        jz, jy = jnp.asarray(z), jnp.asarray(y)
        start = time.perf_counter()
        ours = ours.lower(params, jz, jy, key).compile()
        compile_s = time.perf_counter() - start
        log(f"  sampling: {k}-step images ...")
        j_out, _, j_med, j_mem = time_calls(
            lambda ours=ours, jz=jz, jy=jy: ours(params, jz, jy, key),
            repeats,
            jax.block_until_ready,
        )
        keys = jax.random.split(key, max(k - 1, 1))
        noise = [
            torch.from_numpy(np.moveaxis(np.asarray(jax.random.normal(keys[i], z.shape)), -1, 1))
            for i in range(k - 1)
        ]  # few_step.sample's renoising noise, NCHW

        @torch.no_grad()
        def reference(sigmas=sigmas, noise=noise, module=ref):
            x = float(sigmas[0]) * tz
            for i, sigma in enumerate(sigmas):
                x0 = module(x, torch.full((b,), float(sigma)), ty)
                if i + 1 < len(sigmas):
                    x = x0 + float(sigmas[i + 1]) * noise[i]
            return x0

        def image_diff(t_out, j_out=j_out):
            return float(np.max(np.abs(np.moveaxis(t_out.numpy(), 1, -1) - np.asarray(j_out))))

        t_out, _, t_med, t_mem = time_calls(reference, repeats)
        diff = image_diff(t_out)
        compiled_row = {}
        if compile_torch:
            log(f"  sampling: {k}-step images, torch.compile ...")
            c_out, c_first, c_med, c_mem = time_calls(
                lambda reference=reference: reference(module=compiled_ref), repeats
            )
            compiled_row = dict(
                ref_compiled_steps_per_s=b / c_med, ref_compiled_compile_s=c_first - c_med,
                ratio_vs_compiled=c_med / j_med, ref_compiled_peak_rss_mib=_mib(c_mem),
                ref_compiled_max_abs_image_diff=image_diff(c_out),
            )  # fmt: skip
        rows.append(dict(
            name=f"{k}-step image student (images/s)",
            settings=f"the dmd line's DDPM++ ({s['channels']} channels), batch {b}",
            ours_steps_per_s=b / j_med, ref_steps_per_s=b / t_med, ratio=t_med / j_med,
            ours_compile_s=compile_s, ours_peak_rss_mib=_mib(j_mem),
            ref_peak_rss_mib=_mib(t_mem), ours_loss=None, ref_loss=None,
            loss_abs_diff=None, max_abs_image_diff=diff, **compiled_row,
        ))  # fmt: skip
    ref = compiled_ref = None
    gc.collect()

    net, variables = dit_setup(s)
    model = mdlm.from_flax(variables, s["dit_heads"])
    schedule = masked.get_schedule("loglinear", 1e-3)
    n, bt, length, v = s["text_steps"], s["text_batch"], s["length"], s["vocab"]
    x = masked.all_masked(bt, length, v)

    def text_sample(v, key):  # the weights an argument, not constants of the executable
        return masked.ancestral_sample(lambda xt, t: net.apply(v, xt, t), key, x, schedule, n)

    start = time.perf_counter()
    ours = jax.jit(text_sample).lower(variables, key).compile()
    compile_s = time.perf_counter() - start
    log("  sampling: text ...")
    (j_tokens, j_nfe), _, j_med, j_mem = time_calls(lambda: ours(variables, key), repeats,
                                                    jax.block_until_ready)  # fmt: skip
    mask_probs = np.asarray(schedule.mask_prob(masked.time_grid(n)), np.float64)
    step_keys = jax.random.split(key, n)
    shape = (bt, length, v + 1)
    tx = torch.full((bt, length), v, dtype=torch.int64)

    def same_noise(i):  # our sampler's Gumbel noise of step i (for the token check)
        return torch.from_numpy(np.asarray(jax.random.gumbel(step_keys[i], shape)))

    def own_noise(i):  # the timed runs draw their own, as MDLM's sampler does
        return -torch.log(-torch.log(torch.rand(shape).clamp_(1e-20, 1.0)))

    t_tokens, t_nfe = mdlm.sample(model, tx, mask_probs, same_noise)
    agree = float(np.mean(t_tokens.numpy() == np.asarray(j_tokens)))
    (_, nfe), _, t_med, t_mem = time_calls(lambda: mdlm.sample(model, tx, mask_probs, own_noise),
                                           repeats)  # fmt: skip
    compiled_row = {}
    if compile_torch:
        log("  sampling: text, torch.compile ...")
        cmodel = torch.compile(model)
        start = time.perf_counter()
        c_tokens, _ = mdlm.sample(cmodel, tx, mask_probs, same_noise)  # compiles, and checks
        c_first = time.perf_counter() - start
        _, _, c_med, c_mem = time_calls(lambda: mdlm.sample(cmodel, tx, mask_probs, own_noise),
                                        repeats)  # fmt: skip
        compiled_row = dict(
            ref_compiled_steps_per_s=bt * length / c_med, ref_compiled_compile_s=c_first - c_med,
            ratio_vs_compiled=c_med / j_med, ref_compiled_peak_rss_mib=_mib(c_mem),
            ref_compiled_token_agreement=float(np.mean(c_tokens.numpy() == np.asarray(j_tokens))),
        )  # fmt: skip
    rows.append(dict(
        name=f"text sampler, {n} steps (tokens/s)",
        settings=f"the mdlm line's DiT, batch {bt}, length {length}, cached ancestral sampler",
        ours_steps_per_s=bt * length / j_med, ref_steps_per_s=bt * length / t_med,
        ratio=t_med / j_med, ours_compile_s=compile_s, ours_peak_rss_mib=_mib(j_mem),
        ref_peak_rss_mib=_mib(t_mem), ours_loss=None, ref_loss=None, loss_abs_diff=None,
        ours_nfe=int(j_nfe), ref_nfe=int(t_nfe), token_agreement=agree, **compiled_row,
    ))  # fmt: skip
    return rows


# --------------------------------------------------------------------------- report


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in x.items())
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def print_report(results: dict) -> None:
    env = results["environment"]
    print(
        f"\njax {env['jax_version']} | torch {env['torch_version']} | {env['device']} | "
        f"{env['threads']} threads both sides | commit {str(env['commit'])[:10]} | "
        f"{env['setting']} setting, median of {env['repeats']} | float32"
    )
    print("| line | ours /s | reference /s | ratio (ours/ref speed) | ours compile s | "
          "RSS peak MiB ours / ref | loss ours | loss ref | abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["lines"]:
        print(
            f"| {r['name']} | {_fmt(r['ours_steps_per_s'])} | {_fmt(r['ref_steps_per_s'])} | "
            f"{r['ratio']:.2f}x | {r['ours_compile_s']:.1f} | {r['ours_peak_rss_mib']:.0f} / "
            f"{r['ref_peak_rss_mib']:.0f} | {_fmt(r['ours_loss'])} | {_fmt(r['ref_loss'])} | "
            f"{_fmt(r['loss_abs_diff'])} |"
        )
    for r in results["lines"]:
        print(f"- {r['name']}: {r['settings']}")
        extra = {k: v for k, v in r.items() if k not in REPORT_FIELDS}
        if extra:
            print("  " + "; ".join(f"{k} {_fmt(v)}" for k, v in extra.items()))


def environment(setting: str, repeats: int) -> dict:
    import subprocess

    import torch

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip() or None  # fmt: skip
    return dict(
        jax_version=jax.__version__, torch_version=torch.__version__,
        device=f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
        threads=torch.get_num_threads(), cpu_count=os.cpu_count(), commit=commit,
        setting=setting, repeats=repeats, load_average=os.getloadavg(),
        time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), argv=sys.argv[1:],
    )  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the test setting (seconds)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls (0: the setting's)")
    parser.add_argument(
        "--torch_compile",
        action="store_true",
        help="also time the reference under torch.compile (compile time apart)",
    )
    parser.add_argument(
        "--published",
        action="store_true",
        help="the networks at their published widths: DDPM++ 128 channels, channel_mult "
        "(2, 2, 2), 4 blocks, attention at 16; DiT 12 x 768, 12 heads, vocab 50,257 (size "
        "flags still override)",
    )
    parser.add_argument("--json", default="", help="write every figure to this JSON file")
    for key, value in DEFAULT.items():
        if key != "repeats":
            parser.add_argument(f"--{key}", type=int, default=None,
                                help=f"default {value}, --tiny {TINY[key]}")  # fmt: skip
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        parser.error(f"--only: {bad or 'nothing'} is not a comma-separated list of {PARTS}")
    if args.repeats < 0:
        parser.error(f"--repeats={args.repeats}: must be >= 1 (0 = the setting's default)")
    if args.tiny and args.published:
        parser.error("--published and --tiny: choose one setting")
    settings = dict(TINY if args.tiny else DEFAULT)
    if args.published:
        settings.update(PUBLISHED)
    for key in DEFAULT:
        value = getattr(args, key, None)
        if key != "repeats" and value is not None:
            if value < 1:
                parser.error(f"--{key}={value}: must be >= 1")
            settings[key] = value
    if args.repeats:
        settings["repeats"] = args.repeats
    if (
        settings["dit_width"] % settings["dit_heads"]
        or (settings["dit_width"] // settings["dit_heads"]) % 2
    ):
        parser.error(
            f"--dit_width={settings['dit_width']} must split into --dit_heads="
            f"{settings['dit_heads']} heads of even size"
        )
    if settings["channels"] % 2 or settings["channels"] < 8:
        parser.error(f"--channels={settings['channels']}: must be even and >= 8 (GroupNorm)")
    if settings["resolution"] % 2 ** (settings["levels"] - 1):
        parser.error(
            f"--resolution={settings['resolution']}: must be divisible by 2^(levels - 1) = "
            f"{2 ** (settings['levels'] - 1)}"
        )
    return args, parts, settings


def main(argv=None) -> dict:
    args, parts, s = parse_args(argv)
    _torch()
    t0 = time.perf_counter()
    log = lambda msg: print(
        f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True
    )  # noqa: E731
    results = {
        "environment": environment(
            "tiny" if args.tiny else "published" if args.published else "default", s["repeats"]
        ),
        "settings": s,
        "lines": [],
    }
    start = time.perf_counter()

    def done(rows):  # each line on stderr as soon as it is measured
        results["lines"].extend(rows)
        for row in rows:
            log("  " + json.dumps(row, default=float))

    if "dmd" in parts:
        log("dmd step ...")
        done([bench_dmd(s, s["repeats"], args.torch_compile, log)])
    if "dmd_gan" in parts:
        log("dmd step with the GAN branch ...")
        done([bench_dmd(s, s["repeats"], args.torch_compile, log, gan=True)])
    if "mdlm" in parts:
        log("mdlm step ...")
        done([bench_mdlm(s, s["repeats"], args.torch_compile, log)])
    if "didi" in parts:
        log("didi-instruct step ...")
        done([bench_didi(s, s["repeats"], args.torch_compile, log)])
    if "sampling" in parts:
        log("sampling ...")
        done(bench_sampling(s, s["repeats"], log, args.torch_compile))
    results["total_s"] = time.perf_counter() - start
    print_report(results)
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return results


if __name__ == "__main__":
    main()
