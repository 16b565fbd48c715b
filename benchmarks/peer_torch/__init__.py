"""PyTorch transcriptions of the reference implementations, for `benchmarks/peers.py` only.

One module per reference: `edm_unet` (NVlabs/edm's DDPM++ SongUNet and EDMPrecond),
`fastgen_dmd` (NVlabs/FastGen's DMD2 fake-score and generator updates, without its GAN
branch), `mdlm` (kuleshov-group/mdlm's DIT backbone, SUBS loss and caching sampler).
They import torch (the optional `peers` extra); nothing in `didistill` imports them.
"""
