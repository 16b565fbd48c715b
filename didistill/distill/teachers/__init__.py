"""Teachers, trained with supervision through one helper (`supervised`).

- `toy`: an EDM MLP denoiser on the analytic 2-D mixtures (method `toy_teacher`);
- `images`: an EDM U-Net on images (method `image_teacher`);
- `mdlm`: a masked-diffusion (MDLM) DiT on text (method `mdlm_teacher`);
- `classifier`: an image classifier, the KD teacher and the digits FID feature net
  (method `classifier`).
"""
