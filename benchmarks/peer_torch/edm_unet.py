"""EDM's DDPM++ U-Net (SongUNet) and its EDM preconditioning, in plain PyTorch (NCHW).

Transcribed (facts, not code) from NVlabs/edm @ 008a4e5316c8e3bfe61a62f874bddba254295afb,
`training/networks.py`, restricted to the DDPM++ flavour that `didistill.nets.unet` implements
(embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
decoder_type='standard', resample_filter=[1, 1], one attention head):

- `Linear` 30-43: y = x W^T + b, W [out, in];
- `Conv2d` 49-90: up/down-sampling by the [1, 1] filter f f^T / (sum f)^2 (a [1, 1, 2, 2]
  buffer `resample_filter` of 1/4): down = depthwise conv2d stride 2, up = depthwise
  conv_transpose2d stride 2 of 4 f; then the 'same' conv with the weight [O, I, k, k];
- `GroupNorm` 96-107: min(32, C // 4) groups, eps 1e-6 for DDPM++;
- `AttentionOp` 113-128: w = softmax_k(q^T k / sqrt(C)) in float32 (its hand-written backward
  is what autograd computes in float32, so autograd is used here);
- `UNetBlock` 134-187 (adaptive_scale=False, skip_scale sqrt(1/2), resample_proj=True):
    h = conv0(silu(GN0(x))); h = silu(GN1(h + affine(emb))); h = conv1(dropout(h))
    x = (h + skip(x)) sqrt(1/2); attention: x = (proj(attn(qkv(GN2(x)))) + x) sqrt(1/2),
  qkv channels laid out (head, channel, {q, k, v});
- `PositionalEmbedding` 193-206 with endpoint=True, and SongUNet's sin/cos swap (line 323);
- `SongUNet` 229-366: mapping network, encoder / decoder ModuleDicts named
  '{r}x{r}_conv|_down|_block{i}' / '{r}x{r}_in0|_in1|_up|_block{i}|_aux_norm|_aux_conv',
  U-Net skips concatenated on the channel axis when a block's input width asks for them;
- encoder features for a discriminator: NVlabs/FastGen @ 34f30e8ff1a563555fc0c7d59f1c1409dacd8af2,
  `fastgen/networks/EDM/network.py` 523-545 (the output of each level's `block3`, the last
  block at EDM's 4 blocks per level, collected in the encoder; `return_features_early` returns
  them before the decoder) and 948-965 (otherwise the denoiser and the features of one pass);
- `EDMPrecond` 632-668: D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4, y), with
  c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sd^2 + sigma^2), sd = sigma_data = 0.5.

Parameter and buffer names equal EDM's state-dict names, so `load_state_dict` takes
`didistill.nets.convert_edm.export_state_dict(our_params)` (converted to tensors) with
strict=True. `augment_labels` are never passed (EDM skips `map_augment` then; ours adds
map_augment(0) = 0). Dropout is applied only in `train()` mode; the benchmark runs the
modules in `eval()` mode so both sides are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class Linear(torch.nn.Module):
    def __init__(self, fan_in: int, fan_out: int, bias: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(fan_out, fan_in))
        self.bias = torch.nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x):  # [B, in] -> [B, out]
        return F.linear(x, self.weight, self.bias)


class Conv2d(torch.nn.Module):
    """EDM's Conv2d without fused resampling; `kernel=0`: only the resampling."""

    def __init__(self, cin: int, cout: int, kernel: int, up=False, down=False):
        super().__init__()
        self.cin, self.up, self.down = cin, up, down
        self.weight = torch.nn.Parameter(torch.zeros(cout, cin, kernel, kernel)) if kernel else None
        self.bias = torch.nn.Parameter(torch.zeros(cout)) if kernel else None
        f = torch.ones(2)
        f = (torch.outer(f, f) / f.sum() ** 2)[None, None]  # [1, 1, 2, 2], all 1/4
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):  # [B, C, H, W]
        f = self.resample_filter
        if self.up:
            x = F.conv_transpose2d(x, (4 * f).tile(self.cin, 1, 1, 1), groups=self.cin, stride=2)
        if self.down:
            x = F.conv2d(x, f.tile(self.cin, 1, 1, 1), groups=self.cin, stride=2)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


class GroupNorm(torch.nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = min(32, channels // 4), eps
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class UNetBlock(torch.nn.Module):
    def __init__(self, cin, cout, emb, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.cin, self.dropout, self.attention = cin, dropout, attention
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
        self.affine = Linear(emb, cout)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3)
        self.skip = Conv2d(cin, cout, 1, up=up, down=down) if cout != cin or up or down else None
        if attention:
            self.norm2 = GroupNorm(cout)
            self.qkv = Conv2d(cout, 3 * cout, 1)
            self.proj = Conv2d(cout, cout, 1)

    def forward(self, x, emb):  # x [B, Cin, H, W], emb [B, E]
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None]))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * math.sqrt(0.5)
        if self.attention:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, h * w).unbind(2)  # [B, C, HW]
            logits = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c))
            a = torch.einsum("nqk,nck->ncq", logits.softmax(dim=2), v)
            x = (self.proj(a.reshape(b, c, h, w)) + x) * math.sqrt(0.5)
        return x


class SongUNet(torch.nn.Module):
    """The raw network F(x_in [B, C, H, W], c_noise [B], y [B, L]) -> [B, C, H, W]."""

    def __init__(
        self, img_resolution, img_channels, label_dim=0, augment_dim=0, model_channels=128,
        channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
        dropout=0.10,
    ):  # fmt: skip
        super().__init__()
        self.model_channels, self.num_blocks = model_channels, num_blocks
        emb = model_channels * channel_mult_emb
        self.map_label = Linear(label_dim, model_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        block = dict(emb=emb, dropout=dropout)
        self.enc = torch.nn.ModuleDict()
        cout = img_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        skips = [b.weight.shape[0] if isinstance(b, Conv2d) else b.conv1.weight.shape[0]
                 for b in self.enc.values()]  # fmt: skip
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, img_channels, 3)

    def forward(self, x, c_noise, class_labels=None, features=(), early=False):
        """F(x, c_noise, y) [B, C, H, W]; with `features` (resolutions) also the list of the
        encoder's last-block outputs at those resolutions, in that order (FastGen's
        `feature_indices`); with `early` only that list (the decoder is skipped)."""
        half = self.model_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
        angles = torch.outer(c_noise, freqs)
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # EDM's cos/sin, swapped
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * np.sqrt(self.map_label.weight.shape[1]))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, feats, last = [], {}, f"_block{self.num_blocks - 1}"
        for name, block in self.enc.items():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
            if name.endswith(last):
                feats[int(name.split("x")[0])] = x
        feats = [feats[r] for r in features]
        if early:
            return feats
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if x.shape[1] != block.cin:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return (out, feats) if features else out


class EDMPrecond(torch.nn.Module):
    """D(x [B, C, H, W]; sigma [B], y one-hot [B, L] or None) (EDM's EDMPrecond)."""

    def __init__(self, sigma_data: float = 0.5, **unet):
        super().__init__()
        self.sigma_data = sigma_data
        self.model = SongUNet(**unet)

    def forward(self, x, sigma, class_labels=None, features=(), early=False):
        """D [B, C, H, W]; with `features` (resolutions) (D, [encoder features]); with `early`
        only the features (FastGen's `return_features_early`)."""
        sd, sigma = self.sigma_data, sigma.reshape(-1, 1, 1, 1)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        out = self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels, features, early)
        if early:
            return out
        f, feats = out if features else (out, None)
        d = c_skip * x + c_out * f
        return (d, feats) if features else d


def from_flax(net_cfg: dict, variables) -> EDMPrecond:
    """An `EDMPrecond` carrying the weights of our `UNetDenoiser` `variables`, via
    `didistill.nets.convert_edm.export_state_dict` (EDM names and layouts), strict load."""
    from didistill.nets.convert_edm import export_state_dict

    keys = ("label_dim", "augment_dim", "model_channels", "channel_mult", "channel_mult_emb",
            "num_blocks", "attn_resolutions", "dropout")  # fmt: skip
    unet = {k: net_cfg[k] for k in keys if k in net_cfg}
    unet["img_resolution"] = int(net_cfg["img_resolution"])
    unet["img_channels"] = int(net_cfg["img_channels"])
    module = EDMPrecond(**unet)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
             export_state_dict(variables).items()}  # fmt: skip
    module.load_state_dict(state, strict=True)
    return module.eval()


__all__ = ["EDMPrecond", "SongUNet", "UNetBlock", "from_flax"]
