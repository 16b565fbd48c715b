"""PyTorch transcriptions of the reference implementations, for `benchmarks/peers.py` only.

One module per reference: `edm_unet` (NVlabs/edm's DDPM++ SongUNet and EDMPrecond),
`fastgen_dmd` (NVlabs/FastGen's DMD2 fake-score, discriminator and generator updates, its GAN
branch optional), `mdlm` (kuleshov-group/mdlm's DIT backbone, SUBS loss and caching sampler),
`didi_instruct` (haoyangzheng-ai/didi-instruct's discriminator and student updates).
They import torch (the optional `peers` extra); nothing in `didistill` imports them.
"""
