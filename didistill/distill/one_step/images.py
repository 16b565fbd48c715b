"""The pieces of one-step distillation of an EDM U-Net teacher on images.

`build(config)` returns the `OneStepParts` bundle that `one_step.make_method` uses (selected by
`config.data.kind = 'images'`; configs `digits_distill.py`, `cifar10_distill.py`,
`imagenet64_distill.py`):

- teacher: the frozen U-Net of `config.teacher.checkpoint`, a network file (`nets.files`):
  a converted EDM DDPM++ or ADM network, or a teacher of `configs/digits_teacher.py`;
- generator: G(z, y) = D_theta(sigma_g z; sigma_g, y), z ~ N(0, I) [B, H, W, C], with
  sigma_g = `config.generator.sigma` (80 = sigma_max in DMD2 / FastGen, 2.5 in SiD /
  Uni-Instruct), initialised from the teacher (`generator.init = 'scratch'`: random);
  with `config.generator.num_steps = K > 1` a K-step student (`one_step.few_step`);
  class labels y ~ U{0..K-1} when the teacher is class-conditional (K = label_dim > 0),
  returned as `cond`; None for an unconditional teacher;
- fake score: the same architecture, initialised from the teacher;
- discriminator: heads on the *teacher's* encoder features at
  `config.discriminator.resolutions` (only the heads train: f-distill / FastGen), or with
  `config.discriminator.features = 'fake_score'` on the *fake score's* encoder (SiDA /
  Uni-Instruct: the discriminator loss also trains the shared encoder):
  `config.discriminator.kind = 'fastgen'` is FastGen's `Discriminator_EDM` (`LogitHeads`,
  logits [B, heads]), `'conv'` the earlier pooled `ConvHead`. Gradients
  still flow through the frozen teacher into the input image, for the generator's GAN loss;
- batches: {'x': [B, critic_steps, H, W, C], 'label': [B, critic_steps]} from
  `images.image_batches` (the label only for a conditional teacher);
- evaluate: `samples.png` and `samples.npy` (student, K NFE, [N, H, W, C], labels cycling
  0..K-1) and `teacher_samples.png` (Heun at `config.eval.teacher_nfe`; 0 skips the teacher),
  with the pixel std of both; and, if `config.eval.feature_checkpoint`
  names an existing digits classifier, the feature FID of both against the test split
  (`didistill.eval.fid.classifier_fid`); and, when `config.eval.fid.inception` is set, the
  Inception FID of the student (`didistill.eval.generator_fid`: `config.eval.fid.num_samples`
  per seed set, sharded over every device and process, protocol recorded in eval.json);
- periodic_evaluate (every `config.eval.every` steps, 0 = never): `samples/step_<S>.png`,
  `eval/feature_fid` (the classifier-feature FID, when `config.eval.feature_checkpoint` exists)
  and, when `config.eval.fid.inception` is set, `eval/fid`, each from
  `config.eval.periodic_samples` samples (biased upwards against 50k: comparable only along one
  run's curve).
Mixed precision: `config.model.compute_dtype = 'bfloat16'` runs every U-Net (teacher,
generator, fake score) in bf16 with float32 parameters, outputs and losses.
There are no exact densities: `exact_*` are None.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from didistill.diffusion import edm
from didistill.distill.one_step.image_generator import ImageGenerator, compute_dtype
from didistill.distill.one_step.parts import OneStepParts
from didistill.eval import fid, generator_fid, plots
from didistill.nets.convert_edm import load_unet
from didistill.nets.unet import ConvHead, LogitHeads


def load_teacher_unet(path: str):
    """(net, variables, image shape (H, W, C)) of a U-Net network file, with a helpful error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config.teacher.checkpoint={path!r} does not exist. For digits train a teacher "
            "(python -m didistill.main --config=digits_teacher --workdir=DIR, which "
            "writes DIR/teacher.msgpack; see assets/README.md); for CIFAR-10 (DDPM++) and "
            "ImageNet-64 (ADM) convert EDM's "
            "weights with python -m didistill.nets.convert_edm (see its docstring). Run from "
            "the repository root or pass --config.teacher.checkpoint=PATH."
        )
    net, variables, meta = load_unet(path)
    cfg = meta["net"]
    res = int(cfg.get("img_resolution", 32))
    return net, variables, (res, res, int(cfg.get("img_channels", 3)))


def _check_data(data, image_shape, num_classes):
    shape = tuple(data.image_shape if hasattr(data, "image_shape") else data["image"].shape[1:])
    if shape != tuple(image_shape):
        raise ValueError(
            f"the data's images are {shape} but the teacher makes {tuple(image_shape)}; set "
            "config.data.resolution (or another config.teacher.checkpoint)"
        )
    labels = None if hasattr(data, "image_shape") else data["label"]
    if num_classes and labels is not None and int(np.max(labels)) >= num_classes:
        raise ValueError(f"data labels reach {int(np.max(labels))} >= label_dim {num_classes}")


def build(config) -> OneStepParts:
    """`OneStepParts` for one-step distillation of an image U-Net teacher (see the module)."""
    net, teacher_vars, image_shape = load_teacher_unet(config.teacher.checkpoint)
    model_cfg = config.get("model") or {}
    net = net.clone(dtype=compute_dtype(model_cfg.get("compute_dtype", "float32")))
    num_classes = int(net.label_dim)
    d, g_cfg, disc_cfg = config.distill, config.generator, config.discriminator
    sigma_g = float(g_cfg.sigma)
    fid_settings = generator_fid.FIDSettings.from_config(config.eval)
    if fid_settings is not None:
        generator_fid.check_divisible(fid_settings.num_samples, fid_settings.batch_size)
        generator_fid.check_files(fid_settings, image_shape)
    kind = disc_cfg.get("kind", "conv")
    if kind == "fastgen":
        head = LogitHeads(resolutions=tuple(disc_cfg.resolutions), width=disc_cfg.width)
    elif kind == "conv":
        head = ConvHead(
            resolutions=tuple(disc_cfg.resolutions),
            width=disc_cfg.width,
            num_layers=disc_cfg.num_layers,
        )
    else:
        raise ValueError(f"config.discriminator.kind={kind!r} is not 'fastgen' or 'conv'")

    def denoise(params, x, sigma, cond=None):  # [B, H, W, C], [B], [B] or None
        return net.apply(params, x, sigma, cond)

    def teacher_denoise(x, sigma, cond=None):
        return net.apply(teacher_vars, x, sigma, cond)

    features = disc_cfg.get("features", "teacher")
    if features not in ("teacher", "fake_score"):
        raise ValueError(
            f"config.discriminator.features={features!r} is not 'teacher' or 'fake_score'"
        )

    def disc_logit(params, x, sigma, cond=None, fake_score=None):  # -> [B] or [B, heads]
        trunk = fake_score if features == "fake_score" else teacher_vars  # SiDA: shared encoder
        _, feats = net.apply(trunk, x, sigma, cond, features=True)  # {r: [B, r, r, C]}
        return head.apply(params, {r: feats[r] for r in disc_cfg.resolutions})

    num_steps = int(g_cfg.get("num_steps", 1))
    student = ImageGenerator(net, sigma_g, tuple(image_shape), {}, num_steps, d.sigma_min)
    generator_step = student.step  # (params, x [n, H, W, C], sigma [n], labels) -> x0
    generate_from = student.__call__  # (params, z, labels, key=None) -> x0 after K steps

    def latent(key, n):  # -> (z [n, H, W, C], labels [n] or None)
        k_z, k_y = jax.random.split(key)
        z = jax.random.normal(k_z, (n, *image_shape))
        labels = jax.random.randint(k_y, (n,), 0, num_classes) if num_classes else None
        return z, labels

    def generate(params, key, n):  # -> (x0 [n, H, W, C], labels [n] or None)
        z, labels = latent(key, n)
        return generate_from(params, z, labels, jax.random.fold_in(key, 1)), labels

    def init_params(key):
        k_g, k_h = jax.random.split(key)
        x = jnp.zeros((1, *image_shape))
        labels = jnp.zeros((1,), jnp.int32) if num_classes else None
        if g_cfg.init == "teacher":
            generator = teacher_vars
        elif g_cfg.init == "scratch":
            generator = net.init(k_g, x, jnp.ones((1,)), labels)
        else:
            raise ValueError(f"config.generator.init={g_cfg.init!r} is not 'teacher' or 'scratch'")
        feats = jax.eval_shape(
            lambda: net.apply(teacher_vars, x, jnp.ones((1,)), labels, features=True)[1]
        )
        missing = sorted(set(disc_cfg.resolutions) - set(feats))
        if missing:
            raise ValueError(
                f"config.discriminator.resolutions has {missing}, but the teacher's encoder has "
                f"features at {sorted(feats)}"
            )
        zeros = {r: jnp.zeros(feats[r].shape, feats[r].dtype) for r in disc_cfg.resolutions}
        return generator, teacher_vars, head.init(k_h, zeros)

    def batches(start_step):
        from didistill.data import images

        per_process = config.train.batch_size // jax.process_count()
        k = max(d.critic_steps, 1)
        data = images.load_arrays(config.data)
        _check_data(data, image_shape, num_classes)
        stream = images.image_batches(
            data, config.seed, per_process * k, start_step, jax.process_index()
        )
        for batch in stream:
            out = {"x": batch["image"].reshape(per_process, k, *image_shape)}
            if num_classes:
                out["label"] = batch["label"].reshape(per_process, k)
            yield out

    sample_student = jax.jit(generate_from)
    feature_fid_fn = functools.cache(lambda: fid.classifier_fid(config))  # loaded once
    teacher_nfe = int(config.eval.teacher_nfe)  # 0: no teacher samples (fid_table has its own)
    heun_steps = edm.heun_steps_for_nfe(teacher_nfe) if teacher_nfe else 0
    sample_teacher = jax.jit(
        lambda z, labels: edm.heun_sample(lambda x, s: teacher_denoise(x, s, labels), z, heun_steps)
    )

    def evaluate(params, key, workdir):
        n, chunk = config.eval.num_samples, config.eval.batch_size
        labels = np.arange(n) % num_classes if num_classes else None  # classes in turn
        z = np.asarray(jax.random.normal(key, (n, *image_shape)))
        k_steps = jax.random.fold_in(key, 1)  # the K-step student's renoising noise
        samplers = {
            "student": lambda p, z, lab: sample_student(p, z, lab, jax.random.fold_in(k_steps, s))
        }
        if teacher_nfe:
            samplers["teacher"] = lambda _, z, lab: sample_teacher(z, lab)
        samples = {name: [] for name in samplers}
        for s in range(0, n, chunk):
            lab = None if labels is None else jnp.asarray(labels[s : s + chunk])
            for name, sampler in samplers.items():
                samples[name].append(np.asarray(sampler(params, z[s : s + chunk], lab)))
        samples = {name: np.concatenate(x) for name, x in samples.items()}
        results = {"student/nfe": num_steps}
        if teacher_nfe:
            results["teacher/nfe"] = edm.heun_nfe(heun_steps)
        fid_fn = feature_fid_fn()
        for name, x in samples.items():
            results[f"{name}/pixel_std"] = float(x.std())
            if fid_fn is not None:
                results[f"{name}/feature_fid"] = fid_fn(x)
        if fid_settings is not None:
            out = generator_fid.evaluate_fid(
                generate_from, params, fid_settings, image_shape, num_classes
            )
            results["fid_protocol"] = out.pop("fid_protocol")
            results.update({f"student/{k}": v for k, v in out.items()})
        if jax.process_index() == 0:
            cols = num_classes if 0 < num_classes <= 20 else None
            np.save(os.path.join(workdir, "samples.npy"), samples["student"])
            for name, file in (("student", "samples.png"), ("teacher", "teacher_samples.png")):
                if name in samples:
                    grid = samples[name][: min(n, 10 * (cols or 10))]
                    plots.save_image_grid(grid, os.path.join(workdir, file), cols)
        return results

    sample_grid = jax.jit(student.sample, static_argnums=2)

    def periodic_evaluate(params, key, workdir, step):
        n = min(config.eval.get("grid_samples", 64), config.eval.batch_size)
        grid, _ = sample_grid(params, key, n)
        if jax.process_index() == 0:
            path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
            plots.save_image_grid(np.asarray(grid), path)
        results = {"eval/pixel_std": float(np.asarray(grid).std())}
        feature_fid = feature_fid_fn()
        if feature_fid is not None:  # the digits FID of `periodic_samples` samples
            n = config.eval.get("periodic_samples", 5000)
            labels = jnp.arange(n) % num_classes if num_classes else None
            z = jax.random.normal(jax.random.fold_in(key, 2), (n, *image_shape))
            k_steps = jax.random.fold_in(key, 3)
            chunk = config.eval.batch_size
            samples = [
                np.asarray(
                    sample_student(
                        params,
                        z[s : s + chunk],
                        None if labels is None else labels[s : s + chunk],
                        jax.random.fold_in(k_steps, s),
                    )
                )
                for s in range(0, n, chunk)
            ]
            results["eval/feature_fid"] = feature_fid(np.concatenate(samples))
            results["eval/feature_fid_samples"] = n
        if fid_settings is not None:
            small = fid_settings.replace(
                num_samples=config.eval.get("periodic_samples", 5000), seeds=1
            )
            out = generator_fid.evaluate_fid(generate_from, params, small, image_shape, num_classes)
            results["eval/fid"] = out["fid"]
            results["eval/fid_samples"] = small.num_samples
        return results

    return OneStepParts(
        sigma_data=float(net.sigma_data),
        batch_size=config.train.batch_size,
        init_params=init_params,
        generate=generate,
        denoise=denoise,
        teacher_denoise=teacher_denoise,
        disc_logit=disc_logit,
        exact_student_denoiser=None,
        exact_log_ratio=None,
        batches=batches,
        evaluate=evaluate,
        periodic_evaluate=periodic_evaluate,
        generator_step=generator_step,
        latent=latent,
    )


__all__ = ["build", "load_teacher_unet"]
