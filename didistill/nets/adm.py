"""ADM U-Net (EDM's DhariwalUNet) with EDM preconditioning: the network of EDM's ImageNet-64.

Architecture: Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021
(ADM, openai/guided-diffusion), as re-implemented in EDM (Karras et al. 2022, NVlabs/edm
`training/networks.py`, `DhariwalUNet`), whose ImageNet-64 model
edm-imagenet-64x64-cond-adm is `EDMPrecond(DhariwalUNet(model_channels=192,
channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], label_dim=1000))`.
Module names follow EDM's so that `didistill.nets.convert_edm` maps a state dict one-to-one:
the raw network F is the submodule 'model', with 'map_augment', 'map_layer0', 'map_layer1',
'map_label', the dictionaries 'enc' / 'dec' of blocks '{r}x{r}_conv', '{r}x{r}_down',
'{r}x{r}_block{i}', '{r}x{r}_in0', '{r}x{r}_in1', '{r}x{r}_up', and 'out_norm', 'out_conv'.
Images are NHWC (EDM is NCHW).

F(x; c_noise, y), N = model_channels, E = channel_mult_emb N, y one-hot [B, label_dim]:
    emb = silu(W1 silu(W0 (PE(c_noise) + A(aug))) + L y)                        # [B, E]
    PE(c)_j = [cos(c w_j), sin(c w_j)], w_j = 10000^(-j / (N/2)), j = 0..N/2-1
(EDM's PositionalEmbedding with endpoint=False and no sin/cos swap, unlike DDPM++; L has no
bias and acts on y unscaled, after the two mapping layers). Encoder: a 3x3 conv to
channel_mult[0] N channels, then per resolution level a downsampling block (except the
first level) and `num_blocks` residual blocks; decoder: at the coarsest level two blocks (the
first with attention), elsewhere an upsampling block, then per level `num_blocks + 1` blocks
each fed the concatenation with the matching encoder output; finally
conv3x3(silu(GroupNorm(h))). Attention is in every encoder and decoder block at
`attn_resolutions`. Residual block (`didistill.nets.unet.UNetBlock` with adaptive_scale):
    h = conv0(resample(silu(GN0(x))));  [scale, shift] = Dense(emb)
    h = conv1(dropout(silu(shift + GN1(h) (1 + scale))));  x' = h + skip(resample(x))
    [attention] x'' = proj(MHA(qkv(GN2(x')))) + x',  C / 64 heads of 64 channels
with skip a 1x1 conv only when the channels change (up/down blocks just resample), no
1/sqrt(2) scaling, GroupNorm eps 1e-5, resampling as DDPM++ (EDM's [1, 1] filter: 2x2 mean,
nearest-neighbour 2x). EDM gives a block no attention when C < 64 (zero heads); tiny test
networks can set `channels_per_head` lower to keep attention. Initialisation as EDM's
(PyTorch-default-like U(+-1/sqrt(fan_in)) weights, zero conv1 / proj / out_conv, N(0, 1)
label map) except that biases start at zero (EDM: U(+-1/sqrt(fan_in))); converted weights
replace all of it anyway. EDM ran this model in float16 on GPUs; here it is float32 unless
`dtype` says otherwise.

`ADMDenoiser` wraps F with EDM preconditioning (`didistill.diffusion.edm.precondition`):
D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4), with `UNetDenoiser`'s contract.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from didistill.nets.unet import EDMDenoiser, UNetBlock, conv, group_norm, positional_embedding

INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))
ZEROS = nn.initializers.zeros
EPS = 1e-5  # EDM's GroupNorm default, used throughout ADM


def _block(dropout: float, channels_per_head: int, dtype) -> functools.partial:
    """ADM's UNetBlock settings (EDM's DhariwalUNet block_kwargs plus UNetBlock defaults)."""
    return functools.partial(
        UNetBlock,
        dropout=dropout,
        adaptive_scale=True,
        channels_per_head=channels_per_head,
        resample_proj=False,
        skip_scale=1.0,
        eps=EPS,
        kernel_init=INIT,
        zero_init=ZEROS,
        attn_init=INIT,
        dtype=dtype,
    )


class DhariwalUNet(nn.Module):
    """The raw ADM network F: (x_in [B, H, W, C], c_noise [B], y [B, L]) -> (F, feats).

    F is [B, H, W, C] (float32); feats = {resolution r: last encoder output at r,
    [B, r, r, C_r]}. See the module docstring; attributes follow EDM's DhariwalUNet (defaults
    are its ImageNet-64 ones), plus `channels_per_head` (64 in EDM) and `dtype`.
    """

    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.10
    label_dim: int = 0
    label_dropout: float = 0.0
    augment_dim: int = 0
    channels_per_head: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c_noise, class_labels=None, augment_labels=None, train=False):
        n_ch = self.model_channels
        emb = positional_embedding(c_noise, n_ch, endpoint=False, cos_first=True)  # [B, N]
        if self.augment_dim:  # zeros (no augmentation) by default
            if augment_labels is None:
                augment_labels = jnp.zeros((x.shape[0], self.augment_dim), jnp.float32)
            map_augment = nn.Dense(n_ch, use_bias=False, kernel_init=ZEROS, name="map_augment")
            emb = emb + map_augment(augment_labels)
        emb_dim = n_ch * self.channel_mult_emb
        emb = nn.silu(nn.Dense(emb_dim, kernel_init=INIT, name="map_layer0")(emb))  # [B, E]
        emb = nn.Dense(emb_dim, kernel_init=INIT, name="map_layer1")(emb)
        if self.label_dim:
            y = class_labels.astype(jnp.float32)  # [B, L]
            if train and self.label_dropout:
                keep = jax.random.uniform(self.make_rng("dropout"), (x.shape[0], 1))
                y = y * (keep >= self.label_dropout)
            map_label = nn.Dense(
                emb_dim, use_bias=False, kernel_init=nn.initializers.normal(1.0), name="map_label"
            )
            emb = emb + map_label(y)
        emb = nn.silu(emb)  # [B, E]

        levels = len(self.channel_mult)
        if x.shape[1] != x.shape[2] or x.shape[1] % 2 ** (levels - 1):
            raise ValueError(
                f"images {x.shape[1:3]} must be square with a side divisible by "
                f"2^(len(channel_mult) - 1) = {2 ** (levels - 1)}"
            )
        kwargs = dict(
            model_channels=n_ch,
            channel_mult=tuple(self.channel_mult),
            num_blocks=self.num_blocks,
            attn_resolutions=tuple(self.attn_resolutions),
            dropout=self.dropout,
            channels_per_head=self.channels_per_head,
            dtype=self.dtype,
        )
        skips, feats = _Encoder(**kwargs, name="enc")(x.astype(self.dtype), emb, train)
        h = _Decoder(**kwargs, name="dec")(skips, emb, train)  # [B, H, W, C_0]
        h = nn.silu(group_norm(h.shape[-1], "out_norm", self.dtype, EPS)(h))
        out = conv(x.shape[-1], 3, "out_conv", ZEROS, self.dtype)(h)  # [B, H, W, C]
        return out.astype(jnp.float32), feats


class _Encoder(nn.Module):
    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    channels_per_head: int
    dtype: Any

    @nn.compact
    def __call__(self, x, emb, train):
        # -> skips: every block output (EDM order), feats {res: last output at res}
        block = _block(self.dropout, self.channels_per_head, self.dtype)
        res0, skips, feats = x.shape[1], [], {}
        for level, mult in enumerate(self.channel_mult):
            res, cout = res0 >> level, self.model_channels * mult
            if level == 0:
                x = conv(cout, 3, f"{res}x{res}_conv", INIT, self.dtype)(x)
            else:
                x = block(x.shape[-1], down=True, name=f"{res}x{res}_down")(x, emb, train)
            skips.append(x)
            for idx in range(self.num_blocks):
                attn = res in self.attn_resolutions
                x = block(cout, attention=attn, name=f"{res}x{res}_block{idx}")(x, emb, train)
                skips.append(x)
            feats[res] = x  # [B, res, res, C_level]
        return skips, feats


class _Decoder(nn.Module):
    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    channels_per_head: int
    dtype: Any

    @nn.compact
    def __call__(self, skips, emb, train):
        block = _block(self.dropout, self.channels_per_head, self.dtype)
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
                attn = res in self.attn_resolutions
                cout = self.model_channels * self.channel_mult[level]
                x = block(cout, attention=attn, name=f"{res}x{res}_block{idx}")(x, emb, train)
        return x  # [B, H, W, channel_mult[0] N]


class ADMDenoiser(EDMDenoiser):
    """EDM-preconditioned ADM denoiser D(x; sigma, y) (`EDMDenoiser` around `DhariwalUNet`),
    with `UNetDenoiser`'s contract.

    Attributes: those of `DhariwalUNet` (defaults: EDM's ImageNet-64 ADM), plus `sigma_data`.
    """

    raw_network: ClassVar[type[nn.Module]] = DhariwalUNet
    raw_fields: ClassVar[tuple[str, ...]] = (*EDMDenoiser.raw_fields, "channels_per_head")

    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    channels_per_head: int = 64


__all__ = ["ADMDenoiser", "DhariwalUNet"]
