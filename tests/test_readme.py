"""The README's divergence tour runs as written (so the documentation cannot rot)."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def test_divergence_tour_runs():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "no python block in README.md"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    dv, js = namespace["dv"], namespace["js"]
    assert abs(float(dv.estimate("forward_kl", namespace["log_r_at_q"])) - 0.5) < 0.02
    assert np.all(np.isfinite(np.asarray(js.weight(namespace["log_r"]))))
    grad = namespace["jax"].grad(dv.score_difference_loss)(
        namespace["x"], namespace["score_p"], namespace["score_q"], np.zeros(4), js
    )
    np.testing.assert_allclose(grad, -0.5, rtol=1e-6)
