"""Small PNG writers for toy samples and result tables.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, so importing this
module neither needs a display nor changes pyplot's global backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str) -> str:
    """Writes `fig` to the PNG `path` (folders made as needed) on the Agg canvas; returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def format_metrics(metrics: Mapping[str, float], keys: Sequence[str] | None = None) -> str:
    """'name=value' lines for a plot title, values with 3 significant digits."""
    keys = list(metrics) if keys is None else keys
    return "\n".join(f"{k}={metrics[k]:.3g}" for k in keys if k in metrics)


def _plot_limits(samples_by_name, mixture) -> tuple[float, float, float, float]:
    if mixture is not None:
        means = np.asarray(mixture.means)
        spread = 3.0 * float(np.sqrt(np.max(np.asarray(mixture.eigvals))))
        lo, hi = means.min(axis=0) - spread - 0.5, means.max(axis=0) + spread + 0.5
    else:
        stacked = np.concatenate([np.asarray(s)[:, :2] for s in samples_by_name.values()])
        stacked = stacked[np.all(np.isfinite(stacked), axis=1)]
        lo, hi = np.percentile(stacked, 0.5, axis=0), np.percentile(stacked, 99.5, axis=0)
        pad = 0.1 * (hi - lo) + 1e-3
        lo, hi = lo - pad, hi + pad
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def save_sample_grid(
    samples_by_name: Mapping[str, np.ndarray],
    path: str,
    mixture=None,
    subtitles: Mapping[str, str] | None = None,
    max_points: int = 4000,
    panel_size: float = 3.2,
) -> str:
    """Side-by-side scatter plots of 2-D sample sets, one panel per entry, written to `path`.

    Args:
      samples_by_name: panel title -> samples [N, >= 2] (the first two coordinates are drawn).
      path: PNG file to write (folders are created).
      mixture: optional `GaussianMixture`; draws contours of its log density and mode centres,
        and fixes the axes to its support.
      subtitles: optional panel title -> extra title lines (e.g. `format_metrics(...)`).
      max_points: at most this many points are drawn per panel.
    """
    names = list(samples_by_name)
    fig = Figure(figsize=(panel_size * len(names), panel_size + 0.4))
    x0, x1, y0, y1 = _plot_limits(samples_by_name, mixture)
    contour = None
    if mixture is not None:
        import jax
        import jax.numpy as jnp

        gx, gy = np.meshgrid(np.linspace(x0, x1, 120), np.linspace(y0, y1, 120))
        grid = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], axis=1), jnp.float32)
        log_prob = jax.jit(type(mixture).log_prob)(mixture, grid)  # [120 * 120]
        contour = (gx, gy, np.asarray(log_prob).reshape(gx.shape))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        pts = np.asarray(samples_by_name[name])[:max_points]
        if contour is not None:
            levels = np.max(contour[2]) - np.array([8.0, 4.0, 2.0, 1.0])
            ax.contour(*contour, levels=levels, colors="0.75", linewidths=0.6)
            means = np.asarray(mixture.means)
            ax.scatter(means[:, 0], means[:, 1], marker="x", c="tab:red", s=12, lw=0.8)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, c="tab:blue", rasterized=True)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        extra = (subtitles or {}).get(name)
        ax.set_title(name if not extra else f"{name}\n{extra}", fontsize=8)
    return save_figure(fig, path)


def save_image_grid(images, path: str, num_columns: int | None = None) -> str:
    """Writes images [N, H, W, C] in [-1, 1] (C = 1 or 3) as one PNG grid, 1-pixel gaps."""
    from PIL import Image

    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, c = x.shape
    cols = num_columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    scale = max(1, 256 // max(grid.shape[:2]))  # small images (8x8 digits) are upscaled
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path


def save_bar_plot(
    values: Mapping[str, float], path: str, title: str = "", ylabel: str = "", log: bool = False
) -> str:
    """One bar per entry (label -> value), written to `path`."""
    fig = Figure(figsize=(max(3.0, 0.6 * len(values) + 1.0), 3.0))
    ax = fig.add_subplot(1, 1, 1)
    labels = list(values)
    ax.bar(range(len(labels)), [float(values[k]) for k in labels], color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    return save_figure(fig, path)


def save_line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
) -> str:
    """One line per entry (label -> (xs, ys)) with markers and a legend, written to `path`."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for label, (xs, ys) in series.items():
        ax.plot(np.asarray(xs), np.asarray(ys), marker="o", ms=3, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


__all__ = ["format_metrics", "save_bar_plot", "save_line_plot", "save_sample_grid"]
