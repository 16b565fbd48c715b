"""Few-step students of a masked-diffusion (MDLM) text teacher.

- `student`: the text-student scaffold shared by every method (teacher loading and checks, the
  schedule from the teacher's meta, the cached ancestral sampler, the evaluation prelude);
- `didi` and `didi_losses`: DiDi-Instruct; `guided_sampling`: its reward-guided sampler;
- `step_halving`: the SDTT-style step-halving baseline.
"""
