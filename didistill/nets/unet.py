"""DDPM++ U-Net (EDM's SongUNet, 'ddpmpp' flavour) with EDM preconditioning, and a conv head.

Architecture: Song et al., "Score-Based Generative Modeling through Stochastic Differential
Equations", ICLR 2021 (DDPM++), as re-implemented in EDM (Karras et al. 2022,
NVlabs/edm `training/networks.py`, `SongUNet` with embedding_type='positional',
encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
resample_filter=[1, 1]). Module names follow EDM's so that `didistill.nets.convert_edm` maps
a state dict one-to-one: the raw network F is the submodule 'model', with 'map_label',
'map_augment', 'map_layer0', 'map_layer1', and the dictionaries 'enc' / 'dec' of blocks
'{r}x{r}_conv', '{r}x{r}_down', '{r}x{r}_block{i}', '{r}x{r}_in0', '{r}x{r}_in1',
'{r}x{r}_up', '{r}x{r}_aux_norm', '{r}x{r}_aux_conv'. Images are NHWC (EDM is NCHW).

F(x; c_noise, y):
    emb = silu(W1 silu(W0 (PE(c_noise) + L(y sqrt(label_dim)) + A(aug))))     # [B, E]
    PE(c)_j = [sin(c w_j), cos(c w_j)], w_j = 10000^(-j / (N/2 - 1)), j = 0..N/2-1,
with N = model_channels, E = channel_mult_emb N, y a one-hot label. Encoder: a 3x3 conv,
then per resolution level `num_blocks` residual blocks (and a downsampling block between
levels); decoder: two blocks at the coarsest level (the first with attention), then per level
an upsampling block (except the coarsest) and `num_blocks + 1` blocks each fed the
concatenation with the matching encoder output (U-Net skip), and finally
conv3x3(silu(GroupNorm(h))). Residual block (`UNetBlock`, adaptive_scale=False):
    h = conv0(resample(silu(GN0(x))));  h = silu(GN1(h + Dense(emb)))
    h = conv1(dropout(h));  x' = (h + skip(resample(x))) / sqrt(2)
    [attention] x'' = (proj(softmax(q^T k / sqrt(C)) v) + x') / sqrt(2), q, k, v = qkv(GN2(x'))
with skip a 1x1 conv when channels or resolution change. Resampling with EDM's [1, 1] filter is
exactly a 2x2 average pool (down) and nearest-neighbour repetition (up). GroupNorm uses
min(32, C / 4) groups, eps 1e-6. Initialisation as EDM: Xavier-uniform, the last conv of each
block and of the output scaled by 1e-5, qkv by sqrt(0.2), biases zero.

`UNetDenoiser` wraps F with EDM preconditioning (`didistill.diffusion.edm.precondition`):
D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from didistill.diffusion import edm

XAVIER = nn.initializers.xavier_uniform()
INIT_ZERO = nn.initializers.variance_scaling(1e-10, "fan_avg", "uniform")  # xavier * 1e-5
INIT_ATTN = nn.initializers.variance_scaling(0.2, "fan_avg", "uniform")  # xavier * sqrt(0.2)
SKIP_SCALE = float(np.sqrt(0.5))


def positional_embedding(
    c: jax.Array,
    num_channels: int,
    max_positions: int = 10000,
    endpoint: bool = True,
    cos_first: bool = False,
):
    """EDM's PositionalEmbedding: [B] -> [B, N].

    DDPM++ (the defaults: endpoint=True, EDM's sin/cos swap):
        [sin(c w_j) for j] ++ [cos(c w_j) for j], w_j = max_positions^(-j / (N/2 - 1));
    ADM (endpoint=False, cos_first=True, no swap):
        [cos(c w_j) for j] ++ [sin(c w_j) for j], w_j = max_positions^(-j / (N/2)).
    """
    half = num_channels // 2
    steps = jnp.arange(half, dtype=jnp.float32) / (half - 1 if endpoint else half)
    freqs = (1.0 / max_positions) ** steps
    angles = c.astype(jnp.float32)[:, None] * freqs[None]  # [B, N/2]
    parts = [jnp.cos(angles), jnp.sin(angles)] if cos_first else [jnp.sin(angles), jnp.cos(angles)]
    return jnp.concatenate(parts, axis=-1)  # [B, N]


def group_norm(channels: int, name: str, dtype=jnp.float32, eps: float = 1e-6) -> nn.GroupNorm:
    """EDM's GroupNorm: min(32, C // 4) groups, eps 1e-6 (DDPM++) or 1e-5 (ADM)."""
    groups = min(32, channels // 4)
    if groups < 1 or channels % groups:
        raise ValueError(f"GroupNorm over {channels} channels: need C >= 4 and C % groups == 0")
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name
    )


def conv(features: int, kernel: int, name: str, init=XAVIER, dtype=jnp.float32) -> nn.Conv:
    return nn.Conv(
        features, (kernel, kernel), padding="SAME", kernel_init=init, dtype=dtype, name=name
    )


def downsample(x: jax.Array) -> jax.Array:
    """2x2 average pool, [B, H, W, C] -> [B, H/2, W/2, C] (EDM's [1, 1] filter, stride 2)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x, [B, H, W, C] -> [B, 2H, 2W, C] (EDM's [1, 1] transposed filter)."""
    return x.repeat(2, axis=1).repeat(2, axis=2)


class UNetBlock(nn.Module):
    """EDM's UNetBlock. The defaults are DDPM++'s (adaptive_scale=False, one attention head,
    resample_proj, skip_scale sqrt(1/2), eps 1e-6, Xavier init); `didistill.nets.adm` sets
    ADM's (adaptive_scale: h = silu(shift + GN1(h) (1 + scale)) with [scale, shift] = Dense(emb);
    C / channels_per_head heads, none when that is 0; a 1x1 skip conv only when channels
    change; skip_scale 1; eps 1e-5)."""

    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    dropout: float = 0.0
    adaptive_scale: bool = False
    channels_per_head: int = 0  # 0: one head whatever C (DDPM++)
    resample_proj: bool = True  # 1x1 conv on the skip of up/down blocks too
    skip_scale: float = SKIP_SCALE
    eps: float = 1e-6
    kernel_init: Callable = XAVIER
    zero_init: Callable = INIT_ZERO  # conv1 and proj
    attn_init: Callable = INIT_ATTN  # qkv
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        # x [B, H, W, Cin], emb [B, E] -> [B, H', W', Cout]
        cout, cin, dt, eps = self.out_channels, x.shape[-1], self.dtype, self.eps
        resample = upsample if self.up else downsample if self.down else (lambda t: t)
        orig = x
        h = nn.silu(group_norm(cin, "norm0", dt, eps)(x))
        h = conv(cout, 3, "conv0", self.kernel_init, dt)(resample(h))
        width = 2 * cout if self.adaptive_scale else cout
        emb_out = nn.Dense(width, kernel_init=self.kernel_init, dtype=dt, name="affine")(emb)
        emb_out = emb_out[:, None, None]  # [B, 1, 1, width]
        if self.adaptive_scale:
            scale, shift = emb_out[..., :cout], emb_out[..., cout:]
            h = nn.silu(shift + group_norm(cout, "norm1", dt, eps)(h) * (scale + 1))
        else:
            h = nn.silu(group_norm(cout, "norm1", dt, eps)(h + emb_out))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(cout, 3, "conv1", self.zero_init, dt)(h)
        if cout != cin or self.up or self.down:
            orig = resample(orig)
            if self.resample_proj or cout != cin:
                orig = conv(cout, 1, "skip", self.kernel_init, dt)(orig)
        x = (h + orig) * self.skip_scale  # [B, H', W', Cout]
        heads = cout // self.channels_per_head if self.channels_per_head else 1
        if self.attention and heads:
            b, hh, ww, c = x.shape
            if c % heads:
                raise ValueError(f"{c} channels do not split into {heads} attention heads")
            qkv = conv(3 * c, 1, "qkv", self.attn_init, dt)(group_norm(c, "norm2", dt, eps)(x))
            # EDM's channel layout of qkv is (head, channel, {q, k, v}).
            qkv = qkv.reshape(b, hh * ww, heads, c // heads, 3).astype(jnp.float32)
            q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, HW, heads, C/heads] each
            logits = jnp.einsum("bqnc,bknc->bnqk", q, k / np.sqrt(c // heads))
            w = jax.nn.softmax(logits, axis=-1)  # [B, heads, HW, HW]
            a = jnp.einsum("bnqk,bknc->bqnc", w, v).reshape(b, hh, ww, c).astype(x.dtype)
            x = (conv(c, 1, "proj", self.zero_init, dt)(a) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """The raw DDPM++ network F: (x_in [B, H, W, C], c_noise [B], y [B, L]) -> (F, feats).

    F is [B, H, W, C] (float32); feats = {resolution r: last encoder output at r,
    [B, r, r, C_r]}. See the module docstring; attributes follow EDM's SongUNet (ddpmpp).
    `class_labels` are one-hot (or soft) [B, label_dim]; `augment_labels` [B, augment_dim].
    """

    model_channels: int = 128
    channel_mult: Sequence[int] = (2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dim: int = 0
    label_dropout: float = 0.0
    augment_dim: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c_noise, class_labels=None, augment_labels=None, train=False):
        emb = positional_embedding(c_noise, self.model_channels)  # [B, N]
        if self.label_dim:
            y = class_labels.astype(jnp.float32)  # [B, L]
            if train and self.label_dropout:
                keep = jax.random.uniform(self.make_rng("dropout"), (x.shape[0], 1))
                y = y * (keep >= self.label_dropout)
            y = y * np.sqrt(self.label_dim)
            emb = emb + nn.Dense(self.model_channels, kernel_init=XAVIER, name="map_label")(y)
        if self.augment_dim:  # EDM's augmentation labels; zeros (no augmentation) by default
            if augment_labels is None:
                augment_labels = jnp.zeros((x.shape[0], self.augment_dim), jnp.float32)
            map_augment = nn.Dense(
                self.model_channels, use_bias=False, kernel_init=XAVIER, name="map_augment"
            )
            emb = emb + map_augment(augment_labels)
        emb_dim = self.model_channels * self.channel_mult_emb
        emb = nn.silu(nn.Dense(emb_dim, kernel_init=XAVIER, name="map_layer0")(emb))
        emb = nn.silu(nn.Dense(emb_dim, kernel_init=XAVIER, name="map_layer1")(emb))  # [B, E]

        levels = len(self.channel_mult)
        if x.shape[1] != x.shape[2] or x.shape[1] % 2 ** (levels - 1):
            raise ValueError(
                f"images {x.shape[1:3]} must be square with a side divisible by "
                f"2^(len(channel_mult) - 1) = {2 ** (levels - 1)}"
            )
        kwargs = dict(
            model_channels=self.model_channels,
            channel_mult=tuple(self.channel_mult),
            num_blocks=self.num_blocks,
            attn_resolutions=tuple(self.attn_resolutions),
            dropout=self.dropout,
            dtype=self.dtype,
        )
        skips, feats = _Encoder(**kwargs, name="enc")(x.astype(self.dtype), emb, train)
        out = _Decoder(**kwargs, out_channels=x.shape[-1], name="dec")(skips, emb, train)
        return out.astype(jnp.float32), feats


class _Encoder(nn.Module):
    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, emb, train):
        # -> skips: every block output (EDM order), feats {res: last output at res}
        block = functools.partial(UNetBlock, dropout=self.dropout, dtype=self.dtype)
        res0, skips, feats = x.shape[1], [], {}
        for level, mult in enumerate(self.channel_mult):
            res = res0 >> level
            if level == 0:
                x = conv(self.model_channels, 3, f"{res}x{res}_conv", dtype=self.dtype)(x)
            else:
                x = block(x.shape[-1], down=True, name=f"{res}x{res}_down")(x, emb, train)
            skips.append(x)
            for idx in range(self.num_blocks):
                attn = res in self.attn_resolutions
                name = f"{res}x{res}_block{idx}"
                x = block(self.model_channels * mult, attention=attn, name=name)(x, emb, train)
                skips.append(x)
            feats[res] = x  # [B, res, res, C_level]
        return skips, feats


class _Decoder(nn.Module):
    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    dtype: Any
    out_channels: int

    @nn.compact
    def __call__(self, skips, emb, train):
        block = functools.partial(UNetBlock, dropout=self.dropout, dtype=self.dtype)
        skips = list(skips)
        x, res0, levels = skips[-1], skips[0].shape[1], len(self.channel_mult)
        for level in reversed(range(levels)):
            res, cout = res0 >> level, x.shape[-1]
            if level == levels - 1:
                x = block(cout, attention=True, name=f"{res}x{res}_in0")(x, emb, train)
                x = block(cout, name=f"{res}x{res}_in1")(x, emb, train)
            else:
                x = block(cout, up=True, name=f"{res}x{res}_up")(x, emb, train)
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)  # U-Net skip
                attn = idx == self.num_blocks and res in self.attn_resolutions
                cout = self.model_channels * self.channel_mult[level]
                x = block(cout, attention=attn, name=f"{res}x{res}_block{idx}")(x, emb, train)
        h = nn.silu(group_norm(x.shape[-1], f"{res0}x{res0}_aux_norm", self.dtype)(x))
        return conv(self.out_channels, 3, f"{res0}x{res0}_aux_conv", INIT_ZERO, self.dtype)(h)


class EDMDenoiser(nn.Module):
    """EDM-preconditioned denoiser D(x; sigma, y) around a raw U-Net F (`raw_network`).

    `D = net.apply(params, x, sigma, labels)`; with `train=True` dropout (and label dropout)
    is active and needs `rngs={'dropout': key}`. With `features=True` it returns
    `(D, feats)`, feats = {resolution r: encoder output [B, r, r, C_r]} of F at this sigma
    (the decoder is still evaluated; under jit XLA removes it when D is unused).
    Labels: int classes [B], one-hot/soft [B, L], or None (zeros, like EDM).

    Subclasses name F's class (`raw_network`) and which of their fields it takes
    (`raw_fields`); F's params live under 'model' (EDM's `EDMPrecond.model`).
    """

    raw_network: ClassVar[type[nn.Module]]
    raw_fields: ClassVar[tuple[str, ...]] = (
        "model_channels",
        "channel_mult",
        "channel_mult_emb",
        "num_blocks",
        "attn_resolutions",
        "dropout",
        "label_dim",
        "label_dropout",
        "augment_dim",
        "dtype",
    )

    model_channels: int = 128
    channel_mult: Sequence[int] = (2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dim: int = 0
    label_dropout: float = 0.0
    augment_dim: int = 0
    sigma_data: float = edm.SIGMA_DATA
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, sigma, labels=None, train: bool = False, features: bool = False):
        """x [B, H, W, C], sigma scalar or [B], labels int [B] or one-hot/soft [B, L]."""
        y = label_vectors(labels, self.label_dim, x.shape[0], type(self).__name__)
        fields = {f: getattr(self, f) for f in self.raw_fields}
        fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}
        net = self.raw_network(**fields, name="model")
        feats = {}

        def raw_fn(x_in, c_noise):  # F(c_in x; c_noise): [B, H, W, C], [B] -> [B, H, W, C]
            out, enc_feats = net(x_in, c_noise, y, train=train)
            feats.update(enc_feats)
            return out

        denoised = edm.precondition(raw_fn, x.astype(jnp.float32), sigma, self.sigma_data)
        return (denoised, feats) if features else denoised


class UNetDenoiser(EDMDenoiser):
    """EDM-preconditioned DDPM++ denoiser D(x; sigma, y) (`EDMDenoiser` around `SongUNet`).

    Attributes: those of EDM's SongUNet (see `SongUNet`), plus `sigma_data`. Defaults are EDM's
    CIFAR-10 DDPM++ except `dropout` (EDM trains CIFAR-10 with 0.13) and `augment_dim` (9 in
    EDM's released CIFAR-10 models, which were trained with augmentation).
    """

    raw_network: ClassVar[type[nn.Module]] = SongUNet


def label_vectors(labels, label_dim: int, batch: int, owner: str = "denoiser"):
    """Denoiser labels -> [B, L] float one-hot (zeros when None, like EDM), or None if
    unconditional. `labels` are int class indices [B] or one-hot/soft vectors [B, L]."""
    if not label_dim:
        if labels is not None:
            raise ValueError(f"labels given to an unconditional {owner} (label_dim=0)")
        return None
    if labels is None:
        return jnp.zeros((batch, label_dim), jnp.float32)
    labels = jnp.asarray(labels)
    if labels.ndim == 1:  # class indices
        return jax.nn.one_hot(labels, label_dim, dtype=jnp.float32)
    return labels.astype(jnp.float32).reshape(batch, label_dim)


class ConvHead(nn.Module):
    """Discriminator head on U-Net features: {res: [B, r, r, C]} -> one logit per image [B].

    Per chosen resolution: `num_layers` x (conv3x3 stride 2 while the map is larger than 4x4,
    else stride 1 -> GroupNorm -> SiLU), a spatial mean, then the per-resolution vectors are
    concatenated and a dense layer gives the logit (in the spirit of the small heads of DMD2
    and f-distill on the teacher's / fake score's encoder features).
    """

    resolutions: Sequence[int] | None = None  # None: every resolution in the features
    width: int = 128
    num_layers: int = 2

    @nn.compact
    def __call__(self, feats: dict[int, jax.Array]) -> jax.Array:
        chosen = sorted(feats) if self.resolutions is None else list(self.resolutions)
        pooled = []
        for res in chosen:
            if res not in feats:
                raise KeyError(f"ConvHead wants features at {res}x{res}; have {sorted(feats)}")
            h = feats[res].astype(jnp.float32)  # [B, r, r, C]
            for i in range(self.num_layers):
                stride = 2 if h.shape[1] > 4 else 1
                h = nn.Conv(
                    self.width, (3, 3), strides=stride, padding="SAME", name=f"{res}x{res}_conv{i}"
                )(h)
                h = nn.silu(group_norm(self.width, f"{res}x{res}_norm{i}")(h))
            pooled.append(h.mean(axis=(1, 2)))  # [B, width]
        return nn.Dense(1, name="out")(jnp.concatenate(pooled, axis=-1))[:, 0]  # [B]


def _head_groups(channels: int) -> int:
    """FastGen's `_get_optimal_groups`: C // 4 up to 32 channels, else the largest divisor <= 32."""
    if channels <= 32:
        return max(1, channels // 4)
    groups = 32
    while groups > 1 and channels % groups:
        groups -= 1
    return groups


class LogitHeads(nn.Module):
    """FastGen's EDM discriminator (`Discriminator_EDM`): one logit head per feature resolution.

    Per resolution r: while r > 8, conv 4x4 stride 2 (padding 1) -> GroupNorm -> SiLU; then
    8 -> 4 the same way, conv 4x4 stride 4 (no padding) 4 -> 1 -> GroupNorm -> SiLU and a 1x1
    conv to one logit (maps smaller than 4x4 use one r x r conv to 1x1). Width = the feature
    channels (`width=0`) as in FastGen, or `width`. Returns [B, heads] (FastGen concatenates the
    heads; the GAN losses average every logit and f-distill averages the heads for log r).
    """

    resolutions: Sequence[int] | None = None  # None: every resolution in the features
    width: int = 0  # 0: the feature channels

    @nn.compact
    def __call__(self, feats: dict[int, jax.Array]) -> jax.Array:
        chosen = sorted(feats, reverse=True) if self.resolutions is None else self.resolutions
        logits = []
        for res in chosen:
            if res not in feats:
                raise KeyError(f"LogitHeads wants features at {res}x{res}; have {sorted(feats)}")
            h = feats[res].astype(jnp.float32)  # [B, r, r, C]
            width = self.width or h.shape[-1]
            r, i = res, 0
            while r > 4:
                h = self._block(h, width, (4, 4), 2, ((1, 1), (1, 1)), f"{res}x{res}", i)
                r, i = r // 2, i + 1
            h = self._block(h, width, (r, r), r, "VALID", f"{res}x{res}", i)  # 4x4 -> 1x1
            logits.append(nn.Conv(1, (1, 1), name=f"{res}x{res}_out")(h).reshape(h.shape[0]))
        return jnp.stack(logits, axis=1)  # [B, heads]

    def _block(self, h, width, kernel, stride, pad, prefix, i):  # conv -> GroupNorm -> SiLU
        h = nn.Conv(width, kernel, stride, padding=pad, name=f"{prefix}_conv{i}")(h)
        return nn.silu(nn.GroupNorm(_head_groups(width), epsilon=1e-5, name=f"{prefix}_norm{i}")(h))


__all__ = [
    "ConvHead",
    "LogitHeads",
    "EDMDenoiser",
    "SongUNet",
    "UNetBlock",
    "UNetDenoiser",
    "downsample",
    "group_norm",
    "label_vectors",
    "positional_embedding",
    "upsample",
]
