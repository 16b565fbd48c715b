"""Divergences for distillation: pure functions of log density ratios and logits.

    f_divergences     registry of f-divergences D_f(p || q) = E_q[f(p/q)]: get, names
    estimators        Monte Carlo estimates and the f-GAN variational bound
    categorical       exact divergences between categorical distributions given logits
    score_difference  the f-distill surrogate whose gradient is h(r) (s_q - s_p)

Submodules imported on demand (they pull in ott-jax or are larger):
    transport         Sinkhorn distances (ott-jax) and the SinKD loss
    balanced          BD-KD's entropy-balanced forward/reverse KL
    alignment         f-DPO, f-DPG and the DPH-RL penalty (model in the ratio's numerator)
    unlearning        FLAT (variational f-divergence, template vs forget answers) and NPO

Convention (see docs/design.md): p is the target (teacher), q the model (student), and every
function takes log_r = log p - log q. Nothing here imports the rest of didistill.
"""

from didistill.divergences.categorical import (
    KD_NAMES,
    categorical,
    categorical_from_log_probs,
    categorical_names,
)
from didistill.divergences.estimators import (
    estimate,
    estimate_self_normalized,
    self_normalize_log_ratio,
    variational_bound,
)
from didistill.divergences.f_divergences import FDivergence, get, names, resolve
from didistill.divergences.score_difference import (
    score_difference_loss,
    score_difference_weights,
)

__all__ = [
    "KD_NAMES",
    "FDivergence",
    "categorical",
    "categorical_from_log_probs",
    "categorical_names",
    "estimate",
    "estimate_self_normalized",
    "get",
    "names",
    "resolve",
    "score_difference_loss",
    "score_difference_weights",
    "self_normalize_log_ratio",
    "variational_bound",
]
