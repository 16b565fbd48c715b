"""Small image classifiers (MLP or CNN) for 8x8 digits: the KD teacher, the KD student, and
the feature network of a digits FID.

    logits = net.apply(params, x)                                  # x [B, H, W, C] -> [B, K]
    logits, feats = net.apply(params, x, features=True)            # feats [B, F]
    logits = net.apply(params, x, train=True, rngs={"dropout": k}) # dropout on (if rate > 0)

Two trunks, chosen by `kind`:

- 'mlp': flatten, then one Dense + GELU layer per entry of `widths`; the features are the last
  hidden layer, F = widths[-1] (F = H W C when `widths` is empty: a linear classifier).
- 'cnn': per entry c of `widths` a 3x3 SAME convolution with c channels + GELU, followed by a
  2x2 average pool while the side is still even and > 1 (8 -> 4 -> 2 -> 1); then flatten and
  one Dense + GELU layer of width `hidden`, whose output is the feature vector (F = hidden).

The logits are a final Dense(num_classes) of the features (after dropout when training), so
the features are the penultimate layer, the usual choice for a Frechet distance (Heusel et
al. 2017 use Inception's pool layer). There is no batch norm: the parameters are the whole
state, which keeps training steps and saved files simple.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ("mlp", "cnn")


class Classifier(nn.Module):
    """An MLP or CNN classifier with an optional penultimate-feature output.

    Attributes:
      num_classes: K, the number of logits.
      kind: 'mlp' or 'cnn' (see the module docstring).
      widths: hidden widths (mlp) or convolution channels (cnn), one per layer.
      hidden: width of the dense feature layer after the convolutions (cnn only).
      dropout: dropout rate on the features when `train=True` (0 = off).
    """

    num_classes: int = 10
    kind: str = "mlp"
    widths: Sequence[int] = (64,)
    hidden: int = 128
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, features: bool = False):
        """x [B, H, W, C] (or [B, D]) -> logits [B, K] (and features [B, F])."""
        if self.kind not in KINDS:
            raise ValueError(f"Classifier kind {self.kind!r} is not one of {KINDS}")
        x = jnp.asarray(x, jnp.float32)
        if self.kind == "mlp":
            h = x.reshape(x.shape[0], -1)  # [B, H W C]
            for width in self.widths:
                h = nn.gelu(nn.Dense(int(width))(h))  # [B, width]
        else:
            h = x if x.ndim == 4 else x[..., None]  # [B, H, W, C]
            for channels in self.widths:
                h = nn.gelu(nn.Conv(int(channels), (3, 3), padding="SAME")(h))  # [B, H, W, c]
                if h.shape[1] > 1 and h.shape[1] % 2 == 0:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))  # [B, H/2, W/2, c]
            h = h.reshape(h.shape[0], -1)  # [B, H' W' c]
            h = nn.gelu(nn.Dense(int(self.hidden))(h))  # [B, hidden]
        feats = h  # [B, F]
        if self.dropout > 0.0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, name="logits")(h)  # [B, K]
        return (logits, feats) if features else logits


def make_classifier(net_cfg: Mapping[str, Any]) -> Classifier:
    """The classifier of a `config.net` block or of the 'net' entry of a saved file's meta.

    Keys: kind, widths, num_classes, and optionally hidden (cnn) and dropout. Raises ValueError
    naming the bad key."""
    kind = net_cfg.get("kind", "mlp")
    if kind not in KINDS:
        raise ValueError(f"net.kind={kind!r} is not one of {KINDS}")
    widths = tuple(int(w) for w in net_cfg.get("widths", ()))
    if any(w < 1 for w in widths):
        raise ValueError(f"net.widths={widths} must hold positive integers")
    num_classes = int(net_cfg.get("num_classes", 10))
    hidden = int(net_cfg.get("hidden", 128))
    if num_classes < 2 or hidden < 1:
        raise ValueError(f"net.num_classes={num_classes} must be >= 2, net.hidden={hidden} >= 1")
    dropout = float(net_cfg.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"net.dropout={dropout} must lie in [0, 1)")
    return Classifier(
        num_classes=num_classes, kind=kind, widths=widths, hidden=hidden, dropout=dropout
    )


def num_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))


CLASSIFIER_FILE = "classifier_params.msgpack"
_HOW_TO_TRAIN = (
    "Train one with: python -m didistill.main --config=digits_classifier:teacher "
    f"--workdir=DIR (it writes DIR/{CLASSIFIER_FILE})."
)


def load_classifier(path: str) -> tuple[Classifier, Any, dict[str, Any]]:
    """(module, params, meta) of a classifier file (`didistill.nets.files`):
    logits = module.apply(params, images). FileNotFoundError / ValueError say what to do."""
    from didistill.nets.files import load_model

    return load_model(path, "classifier", "classifier", _HOW_TO_TRAIN)


__all__ = [
    "CLASSIFIER_FILE",
    "KINDS",
    "Classifier",
    "load_classifier",
    "make_classifier",
    "num_params",
]
