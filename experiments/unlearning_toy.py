"""FLAT unlearning on an enumerable toy, against gradient ascent, NPO, IDK and DPO.

    python -m experiments.unlearning_toy [--quick] [--out runs/unlearning_toy]

Everything is exact: answers are enumerated, losses and metrics are sums over them, training
is full-batch. Writes `<out>/results.md`, `<out>/results.json` and `<out>/unlearning_toy.png`.

The "language model" is a linear softmax policy pi(y | x) = softmax(phi(x) W + b) over 10
answers plus one template answer ("I don't know", index 10). 32 prompts fall into 4 topics
(phi = topic centre + noise, so prompts of one topic share parameters); each prompt has a
random correct answer. The original model pi_0 is this policy fitted to the correct answers.
Unlearning: forget the answers of 4 prompts of topic 0, using only those 4 (prompt, answer)
pairs and the template; the other 28 prompts are the retained ones (4 of them, the
"neighbours", share topic 0). Over training we record, exactly:
  forget prob    mean pi(y_f | x) over the forget prompts (lower is better)
  template prob  mean pi(template | x) over the forget prompts (higher is better)
  retain KL      mean KL(pi_0(. | x) || pi(. | x)) over the retained prompts (lower is better)
  neighbour KL   the same over the 4 same-topic retained prompts.

Methods (forget data only): FLAT for every registered f-divergence (mean-token-probability
critic; one token here, so the critic is the answer's probability); gradient ascent on
log pi(y_f | x); NPO (beta 0.1, reference pi_0); IDK, cross-entropy on the template; DPO with
the template preferred over the forget answer (beta 0.1, reference pi_0); and FLAT reverse KL
with the reference code's activation -exp(+v) (see didistill/divergences/unlearning.py).

Schedule after the FLAT paper's code (UCSC-REAL/FLAT @ bf2ef07): AdamW ("paged_adamw_32bit",
unlearn.py line 111) with weight decay 0.01 (config/forget.yaml), 5 epochs, one epoch of
linear warm-up then linear decay (unlearn.py lines 98-104, the transformers default), beta 0.1
for NPO and DPO (dataloader.py line 52). DIFFERENT here: the learning rate (the paper's 1e-5 for
Llama-2-7B on TOFU, 2e-7 on Harry Potter, is tuned for a 7B model; this 200-parameter model
uses 0.05) and full-batch steps (100 per "epoch").

A second, closed-form check: on one prompt with a tabular policy, FLAT's infimum
-g(1) + f*(g(0)) is reached at template probability 1 for every divergence.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from didistill.divergences import alignment, f_divergences, unlearning

NUM_ANSWERS, TEMPLATE = 10, 10  # answers 0..9, template index 10
TOPICS, PER_TOPIC, DIM = 4, 8, 12
FORGET = np.arange(4)  # prompts 0-3 (topic 0)
NEIGHBOURS = np.arange(4, 8)  # prompts 4-7 (topic 0, retained)
RETAIN = np.arange(4, TOPICS * PER_TOPIC)
PAPER = {  # UCSC-REAL/FLAT @ bf2ef07: config/forget.yaml, unlearn.py, dataloader.py
    "epochs": 5,
    "weight_decay": 0.01,
    "warmup_epochs": 1,
    "beta": 0.1,
    "default_divergence": "total_variation",
}
LEARNING_RATE = 0.05  # toy-specific (the paper: 1e-5 on TOFU, 2e-7 on Harry Potter)
DIVERGENCES = tuple((n, {"alpha": 0.5} if n == "alpha" else {}) for n in f_divergences.names())


def _label(name, params):
    return f"{name}({params['alpha']})" if params else name


def make_problem(seed=0):
    """Prompt features [P, D], correct answers [P] and the original model's parameters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(TOPICS, DIM)) * 1.5
    features = np.repeat(centres, PER_TOPIC, axis=0) + rng.normal(size=(TOPICS * PER_TOPIC, DIM))
    answers = rng.integers(0, NUM_ANSWERS, size=TOPICS * PER_TOPIC)
    features, answers = jnp.asarray(features), jnp.asarray(answers)
    init = {"w": jnp.zeros((DIM, NUM_ANSWERS + 1)), "b": jnp.zeros(NUM_ANSWERS + 1)}

    def nll(params):
        logp = policy_log_probs(params, features)
        return -jnp.mean(logp[jnp.arange(answers.size), answers])

    optimizer = optax.adam(0.05)

    def step(carry, _):
        params, state = carry
        grads = jax.grad(nll)(params)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (original, _), _ = jax.lax.scan(step, (init, optimizer.init(init)), None, length=300)
    return features, answers, original


def policy_log_probs(params, features):
    return jax.nn.log_softmax(features @ params["w"] + params["b"], axis=-1)  # [P, V]


def method_losses(features, answers, original):
    """name -> loss(params): every unlearning objective, on the forget prompts only."""
    x_f, y_f = features[FORGET], answers[FORGET]
    rows = jnp.arange(FORGET.size)
    ref_logp = policy_log_probs(original, x_f)
    ref_forget, ref_template = ref_logp[rows, y_f], ref_logp[:, TEMPLATE]  # [F]

    def parts(params):
        logp = policy_log_probs(params, x_f)
        return logp[rows, y_f], logp[:, TEMPLATE]  # [F], [F]

    def flat(name, params_):
        def loss(params):
            forget, template = parts(params)
            return jnp.mean(
                unlearning.flat_loss(template[:, None], forget[:, None], divergence=name, **params_)
            )

        return loss

    def flat_reference_rkl(params):  # the reference code's "Reverse-KL": -exp(+v) activation
        forget, template = parts(params)
        return jnp.mean(jnp.exp(jnp.exp(template)) - 1.0 - jnp.exp(forget))

    losses = {f"FLAT {_label(n, p)}": flat(n, p) for n, p in DIVERGENCES}
    losses["FLAT reverse_kl, reference sign"] = flat_reference_rkl
    losses["gradient ascent"] = lambda params: jnp.mean(parts(params)[0])
    losses["NPO"] = lambda params: jnp.mean(
        unlearning.npo_loss(parts(params)[0], ref_forget, beta=PAPER["beta"])
    )
    losses["IDK (template CE)"] = lambda params: -jnp.mean(parts(params)[1])
    losses["DPO (template > forget)"] = lambda params: jnp.mean(
        alignment.fdpo_loss(
            parts(params)[1], parts(params)[0], ref_template, ref_forget, beta=PAPER["beta"]
        )
    )
    return losses


def metrics(params, features, answers, original):
    """forget prob, template prob, retain KL, neighbour KL (module docstring)."""
    logp = policy_log_probs(params, features)
    logp0 = policy_log_probs(original, features)
    kl = jnp.sum(jnp.exp(logp0) * (logp0 - logp), axis=-1)  # [P]
    prob = jnp.exp(logp)
    return jnp.stack(
        [
            jnp.mean(prob[FORGET, answers[FORGET]]),
            jnp.mean(prob[FORGET, TEMPLATE]),
            jnp.mean(kl[RETAIN]),
            jnp.mean(kl[NEIGHBOURS]),
        ]
    )


def schedule(steps):
    warmup = max(1, steps * PAPER["warmup_epochs"] // PAPER["epochs"])
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, LEARNING_RATE, warmup),
            optax.linear_schedule(LEARNING_RATE, 0.0, steps - warmup),
        ],
        [warmup],
    )


def train_all(loss_fns, params, steps, record):
    """AdamW on every loss_fns[m] from the same params, as one compiled scan.

    The copies are stacked on a leading axis and their losses summed: gradients, Adam and
    weight decay act elementwise, so each copy trains exactly as it would alone. Returns
    the history of record(params_m), before every step and after the last: [steps+1, M, ...].
    """
    count = len(loss_fns)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a] * count), params)
    take = lambda tree, m: jax.tree_util.tree_map(lambda a: a[m], tree)
    total = lambda tree: sum(fn(take(tree, m)) for m, fn in enumerate(loss_fns))
    optimizer = optax.adamw(schedule(steps), weight_decay=PAPER["weight_decay"])
    record_all = jax.vmap(record)

    def step(carry, _):
        tree, state = carry
        updates, state = optimizer.update(jax.grad(total)(tree), state, tree)
        return (optax.apply_updates(tree, updates), state), record_all(tree)

    run = jax.jit(lambda t: jax.lax.scan(step, (t, optimizer.init(t)), None, length=steps))
    (stacked, _), history = run(stacked)
    return jnp.concatenate([history, record_all(stacked)[None]], axis=0)


def run_toy(steps):
    features, answers, original = make_problem()
    record = lambda params: metrics(params, features, answers, original)
    losses = method_losses(features, answers, original)
    histories = np.asarray(train_all(list(losses.values()), original, steps, record))
    curves, rows = {}, []
    start = record(original)
    for m, name in enumerate(losses):
        history = histories[:, m]  # [steps + 1, 4]
        curves[name] = history.tolist()
        below = np.nonzero(history[:, 0] <= 0.05)[0]
        rows.append(
            {
                "method": name,
                "forget prob": float(history[-1, 0]),
                "template prob": float(history[-1, 1]),
                "retain KL": float(history[-1, 2]),
                "neighbour KL": float(history[-1, 3]),
                "step forget<=0.05": int(below[0]) if below.size else -1,
                "retain KL then": float(history[below[0], 2]) if below.size else float("nan"),
            }
        )
    original_row = {
        "method": "(original model)",
        "forget prob": float(start[0]),
        "template prob": float(start[1]),
        "retain KL": 0.0,
        "neighbour KL": 0.0,
        "step forget<=0.05": -1,
        "retain KL then": float("nan"),
    }
    return [original_row] + rows, curves


def run_tabular(steps):
    """One prompt, tabular logits: FLAT's closed-form infimum, reached by every divergence.
    (All divergences train in one compiled scan, on stacked independent copies.)"""
    rng = np.random.default_rng(1)
    init = jnp.asarray(rng.normal(size=NUM_ANSWERS + 1)).at[0].add(3.0)  # forget answer 0

    def loss(theta, name, params):
        logp = jax.nn.log_softmax(theta)
        template, forget = logp[TEMPLATE][None, None], logp[0][None, None]
        return unlearning.flat_loss(template, forget, divergence=name, **params)[0]

    total = lambda thetas: sum(loss(thetas[m], *d) for m, d in enumerate(DIVERGENCES))
    optimizer = optax.adam(0.1)

    def step(carry, _):
        thetas, state = carry
        updates, state = optimizer.update(jax.grad(total)(thetas), state, thetas)
        return (optax.apply_updates(thetas, updates), state), None

    thetas = jnp.stack([init] * len(DIVERGENCES))
    run = jax.jit(lambda t: jax.lax.scan(step, (t, optimizer.init(t)), None, length=steps))
    (thetas, _), _ = run(thetas)
    rows = []
    for theta, (name, params) in zip(thetas, DIVERGENCES, strict=True):
        prob = jax.nn.softmax(theta)
        infimum = float(unlearning.flat_infimum(name, **params))
        rows.append(
            {
                "divergence": _label(name, params),
                "infimum -g(1)+f*(g(0))": infimum,
                "loss - infimum": float(loss(theta, name, params)) - infimum,
                "template prob": float(prob[TEMPLATE]),
                "forget prob": float(prob[0]),
            }
        )
    return rows


def _markdown(title, rows):
    keys = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return "—" if np.isnan(v) else (f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}")
        return "—" if v == -1 else str(v)

    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_plot(curves, path):
    """Three panels over training steps: forget prob, template prob, retain KL."""
    fig = Figure(figsize=(13.5, 4.8))
    titles = ("forget-answer probability", "template probability", "retain KL(pi_0 || pi)")
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    baseline_colours = iter(["tab:red", "tab:orange", "tab:green", "tab:purple", "black"])
    flat_names = [n for n in curves if n.startswith("FLAT") and "reference" not in n]
    for name, history in curves.items():
        history = np.asarray(history)
        steps = np.arange(1, history.shape[0] + 1)  # step + 1, for the log axis
        if name in flat_names:  # FLAT: thin blues, total variation (the paper's default) thick
            shade = 0.35 + 0.6 * flat_names.index(name) / len(flat_names)
            wide = "total_variation" in name
            style = {"color": (0.1, 0.3 * shade, shade), "lw": 2.2 if wide else 0.9}
        else:
            style = {"color": next(baseline_colours), "lw": 2.0, "linestyle": "--"}
            style["linestyle"] = ":" if "reference sign" in name else "--"
        for i, ax in enumerate(axes):
            ax.plot(steps, history[:, i], label=name, **style)
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step + 1")
        ax.set_xscale("log")
    axes[2].set_yscale("symlog", linthresh=1e-3)
    axes[2].set_ylim(bottom=0.0)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=5)
    FigureCanvasAgg(fig)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/unlearning_toy")
    parser.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # exact comparisons with closed forms
    begin = time.time()
    steps = 50 if args.quick else 100 * PAPER["epochs"]
    toy_rows, curves = run_toy(steps)
    tabular_rows = run_tabular(2000)  # cheap steps: --quick runs it in full
    results = {
        "steps": steps,
        "learning_rate": LEARNING_RATE,
        "paper_hyperparameters": PAPER,
        "toy": toy_rows,
        "tabular": tabular_rows,
        "curves": curves,
    }
    os.makedirs(args.out, exist_ok=True)
    report = (
        _markdown(f"Unlearning toy: 4 forget prompts, 28 retained, {steps} steps", toy_rows)
        + "\n"
        + _markdown(
            "FLAT on one prompt with a tabular policy: the closed-form infimum", tabular_rows
        )
    )
    results["wall_seconds"] = time.time() - begin
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    save_plot(curves, os.path.join(args.out, "unlearning_toy.png"))
    print(report)
    print(f"wall time {results['wall_seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
