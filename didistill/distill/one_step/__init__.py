"""One-step distillation of an EDM teacher: f-distill, DMD2, Diff-Instruct, SiD, Uni-Instruct.

- `table`: the one table of methods (name, generator loss, divergences, GAN), from which every
  list of method names is derived;
- `losses`: the pure losses, one screen each;
- `method`: `make_method(config)`, the engine `Method` written once against `parts`;
- `parts`: the `OneStepParts` bundle a data domain provides; `toy` and `images` build it.
"""
