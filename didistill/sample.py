"""Draw images from an exported one-step generator, without the training state.

    python -m didistill.sample --params=FILE --out=DIR [--num_samples=64] [--seed=0]
        [--labels=3 | --labels=0,1,2] [--batch_size=250]

FILE comes from `python -m didistill.evaluate --workdir=RUN --export=FILE`. Writes
`DIR/samples.png` (a grid) and `DIR/samples.npz` ('images' uint8 [N, H, W, C], 'labels' [N]
or absent), quantised as a PNG would be. Sample j uses noise (and, unless --labels is given, a
uniform label) from `fold_in(key(seed), j)`, EDM's one-seed-per-image convention.

From Python:

    from didistill.sample import draw
    images, labels = draw("student.msgpack", 16, seed=0)   # uint8 [16, H, W, C], [16] or None

A missing file, a file of another kind, or labels out of range is one line
`didistill.sample: error: ...`.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "didistill.sample"


def draw(path_or_loaded, num_samples: int, seed: int = 0, labels=None, batch_size: int = 250):
    """(images uint8 [N, H, W, C], labels int [N] or None) from a generator file (or the
    (generator, params) of `image_generator.load_generator`)."""
    import jax
    import numpy as np

    from didistill.distill.one_step.image_generator import load_generator
    from didistill.eval.generator_fid import sample_inputs

    if isinstance(path_or_loaded, (str, os.PathLike)):
        generator, params, _ = load_generator(str(path_or_loaded))
    else:
        generator, params = path_or_loaded
    k = generator.num_classes
    if labels is not None:
        labels = np.resize(np.asarray(labels, np.int32), num_samples)
        if not k or labels.min() < 0 or labels.max() >= k:
            raise ValueError(
                f"--labels: the generator has {k} classes (0..{k - 1})"
                if k
                else "--labels: the generator is unconditional"
            )
    sample = jax.jit(generator)
    out, out_labels = [], []
    for s in range(0, num_samples, batch_size):
        idx = np.arange(s, min(s + batch_size, num_samples))
        z, y = sample_inputs(idx, generator.image_shape, k, seed)
        if labels is not None:
            y = labels[idx]
        x = np.asarray(sample(params, z, y))
        out.append(np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8))
        out_labels.append(None if y is None else np.asarray(y))
    images = np.concatenate(out)
    return images, (None if out_labels[0] is None else np.concatenate(out_labels))


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="exported generator file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", default=None, help="one class, or a comma list (cycled)")
    parser.add_argument("--batch_size", type=int, default=250)
    args = parser.parse_args(argv)
    try:
        import numpy as np

        from didistill.eval import plots

        labels = None
        if args.labels is not None:
            try:
                labels = [int(v) for v in args.labels.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"--labels={args.labels!r}: give class indices") from None
        if args.num_samples < 1:
            raise ValueError(f"--num_samples={args.num_samples}: give a positive integer")
        images, labels = draw(args.params, args.num_samples, args.seed, labels, args.batch_size)
        os.makedirs(args.out, exist_ok=True)
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        with open(os.path.join(args.out, "samples.npz"), "wb") as f:
            np.savez(f, **arrays)
        grid = images[: min(len(images), 100)].astype(np.float32) / 127.5 - 1.0
        png = plots.save_image_grid(grid, os.path.join(args.out, "samples.png"))
        print(f"wrote {len(images)} images to {os.path.join(args.out, 'samples.npz')} and {png}")
        return images, labels
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
