"""experiments/preference_toy.py: trained f-DPO policies reach the closed-form optimum."""

import jax

from experiments import preference_toy


def test_fdpo_reaches_the_known_optimum():
    with jax.enable_x64(True):
        rows = {row["divergence"]: row for row in preference_toy.run_fdpo(steps=3000)}
    assert rows["reverse_kl"]["tv_to_closed_form"] < 1e-6  # DPO's optimum
    for name in ("forward_kl", "jensen_shannon", "alpha(0.5)"):
        assert rows[name]["tv_to_closed_form"] < 1e-3, name
    # The trained policies improve the reward over the reference policy.
    reference = rows["(reference policy)"]["expected_reward"]
    assert rows["reverse_kl"]["expected_reward"] > reference
