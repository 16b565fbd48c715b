"""Few-step text distillation: generative perplexity and entropy against the number of steps.

    .venv/bin/python experiments/ppl_table.py [--quick] [--workdir runs/ppl_table]
        [--teacher PATH] [--steps 8,16,32,64,128] [--didi_steps 200]
        [--sdtt_divergences reverse_kl,forward_kl]

On a synthetic language with exact likelihood (the teacher's own `data.language` and
`data.length`), the exact source is the judge: generative perplexity = exp(mean true NLL per
token of the samples), always reported with the samples' mean unigram entropy (a collapsed
sampler has low perplexity and low entropy). Rows:
- 'source (exact)': exp of the source's entropy per token (the perplexity of perfect samples)
  and the entropy of held-out data;
- 'MDLM teacher': the teacher's ancestral sampler at each step count (the DiDi run's
  evaluation), and at `--teacher_long` steps (1024: with caching the NFE is at most the
  sequence length; `teacher_samples_report`);
- 'DiDi-Instruct', 'DiDi-Instruct + guided sampler' (`config.eval.guided`): one run of
  `configs/synthetic_didi.py` from the teacher;
- 'step halving (<divergence>)': one run of `configs/synthetic_sdtt.py` per divergence
  (rounds 64 -> 32 -> 16 -> 8 steps);
- 'factorised limit (exact marginals)': the sampler that draws each step's tokens
  independently from the source's exact conditional marginals given the revealed tokens, on
  MDLM's reveal law (`eval/factorised_limit.py`, Monte Carlo, `--limit_samples`): the
  factorised k-step sampler closest to the source in KL(p || q), what a perfect teacher
  reaches at k steps. A student below it has paid in diversity (see that module). Drawn
  dotted in the figure; order-1 Markov and HMM languages only.
Every student run is an ordinary engine run in `<workdir>/<name>` (reused when finished).

The teacher: `--teacher`, else the shipped `assets/text/markov_tiny_teacher.msgpack`, else one
trained here by `configs/synthetic_mdlm.py:markov_tiny,cpu` (the shipped asset's command).
Writes `<workdir>/results.md`, `results.json` and `ppl_vs_steps.png`. The default took 26
minutes on 2 CPU cores shared with three other jobs (16c5d67; docs/results/ppl_table.json);
`--quick` (steps 8 and 32, 60 DiDi steps, one divergence) takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `experiments` is a folder of the repository, not a package

from didistill.configs import synthetic_didi, synthetic_mdlm, synthetic_sdtt  # noqa: E402
from experiments import common  # noqa: E402

SHIPPED_TEACHER = synthetic_didi.SHIPPED_TEACHER
TEACHER_LANGUAGE = synthetic_didi.SHIPPED_LANGUAGE


def teacher_config():
    """The shipped text teacher's config (assets/README.md gives the same command)."""
    return synthetic_mdlm.get_config(f"{TEACHER_LANGUAGE},cpu")


def _settings(quick: bool) -> dict:
    if quick:
        return {"steps": "8,32", "didi_steps": 60, "sdtt_round": 30, "divergences": "reverse_kl"}
    return {
        "steps": "8,16,32,64,128",
        "didi_steps": 200,  # configs/synthetic_didi.py:<language>,cpu (tests/test_didi.py)
        "sdtt_round": 200,
        "divergences": "reverse_kl,forward_kl",
    }


def teacher_path(args) -> str:
    if args.teacher:
        return args.teacher
    shipped = os.path.join(REPO, SHIPPED_TEACHER)
    if os.path.isfile(shipped):
        return shipped
    config = teacher_config()
    config.train.progress = False
    workdir = os.path.join(args.workdir, "teacher")
    common.train_run(config, workdir)
    from didistill.distill.teachers.mdlm import TEACHER_FILE

    return os.path.join(workdir, TEACHER_FILE)


def _common(config, teacher: str, meta: dict, steps: tuple[int, ...]):
    config.teacher.checkpoint = teacher
    config.data.language = meta["data"]["language"]
    config.data.length = int(meta["data"]["length"])
    config.eval.sample_steps = steps
    config.train.progress = False
    return config


def didi_config(teacher, meta, steps, num_steps: int):
    """`configs/synthetic_didi.py:<language>,cpu` from `teacher` for `num_steps` steps."""
    config = synthetic_didi.get_config(meta["data"]["language"] + ",cpu")
    config = _common(config, teacher, meta, steps)
    config.train.num_steps = num_steps
    config.train.checkpoint_every = num_steps
    config.eval.guided.enabled = True
    return config


def sdtt_config(teacher, meta, steps, divergence: str, steps_per_round: int):
    config = _common(synthetic_sdtt.get_config(meta["data"]["language"]), teacher, meta, steps)
    config.distill.divergence = divergence
    config.distill.steps_per_round = steps_per_round
    config.train.num_steps = config.distill.rounds * steps_per_round
    config.train.checkpoint_every = config.train.num_steps
    return config


def teacher_samples_report(teacher: str, num_steps: int, num_samples: int = 512, seed: int = 0):
    """`sample_report` (exact judge) of the teacher's ancestral sampler at `num_steps`."""
    import jax

    from didistill.data import text
    from didistill.diffusion import masked
    from didistill.distill.teachers.mdlm import load_teacher_denoiser, logits_fn_of
    from didistill.eval import text as text_eval

    net, params, meta = load_teacher_denoiser(teacher)
    lang, length = text.get_language(meta["data"]["language"]), int(meta["data"]["length"])
    dcfg = meta.get("diffusion", {})
    schedule = masked.get_schedule(dcfg.get("schedule", "loglinear"), dcfg.get("eps", 1e-3))
    sample = jax.jit(
        lambda k, x: masked.ancestral_sample(
            logits_fn_of(net, params), k, x, schedule, num_steps, cache=not net.time_conditioning
        )
    )
    tokens, nfe = text_eval.sample_in_chunks(
        sample, jax.random.key(seed), num_samples, 256, length, net.vocab_size
    )
    return text_eval.sample_report(tokens, text_eval.exact_judge(lang), nfe, lang)


def limit_row(meta: dict, steps, num_samples: int) -> dict | None:
    """The 'factorised limit (exact marginals)' row at every step count (None when the
    teacher's language is not order-1 Markov or HMM)."""
    from didistill.data import text
    from didistill.eval import factorised_limit

    lang, length = text.get_language(meta["data"]["language"]), int(meta["data"]["length"])
    try:
        factorised_limit.chain_of(lang)
    except ValueError:
        return None
    cells = {
        n: factorised_limit.limit_report(lang, length, n, num_samples=num_samples) for n in steps
    }
    return {"name": LIMIT_ROW, "cells": cells}


LIMIT_ROW = "factorised limit (exact marginals)"


def rows_of(name: str, prefix: str, results: dict, steps) -> dict:
    """{'name', 'cells': {steps: {'gen_ppl', 'entropy', 'nfe', 'invalid_rate'}}} of one eval."""
    cells = {}
    for n in steps:
        key = f"{prefix}/steps{n}/"
        if key + "gen_ppl" in results:
            cells[n] = {
                k: results[key + k]
                for k in ("gen_ppl", "entropy", "nfe", "invalid_rate")
                if key + k in results
            }
    return {"name": name, "cells": cells}


def markdown(rows: list[dict], steps, header: str) -> str:
    lines = [
        header,
        "",
        "| model | " + " | ".join(f"{n} steps" for n in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for n in steps:
            c = row["cells"].get(n)
            cells.append(f"{c['gen_ppl']:.2f} ({c['entropy']:.2f})" if c else "-")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], source_ppl: float, path: str) -> str:
    """Generative perplexity and entropy against sampler steps (log x), one line per model."""
    from matplotlib.figure import Figure

    from didistill.eval.plots import save_figure

    fig = Figure(figsize=(10.0, 3.8))
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for row in rows:
        steps = sorted(row["cells"])
        if not steps:
            continue
        style = dict(color="0.4", ls=":", marker="x") if row["name"] == LIMIT_ROW else {}
        for ax, metric in zip(axes, ("gen_ppl", "entropy"), strict=True):
            values = [row["cells"][n][metric] for n in steps]
            ax.plot(steps, values, **({"marker": "o", "ls": "-"} | style), label=row["name"])
    axes[0].axhline(source_ppl, color="k", ls="--", lw=1, label="source (exact)")
    for ax, label in zip(
        axes, ("generative perplexity (exact judge)", "unigram entropy"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/ppl_table")
    parser.add_argument("--quick", action="store_true", help="2 step counts, short runs")
    parser.add_argument("--teacher", default="", help="teacher_params.msgpack (see above)")
    parser.add_argument("--steps", default=None, help="sampler steps (8,16,32,64,128)")
    parser.add_argument("--teacher_long", type=int, default=1024, help="the teacher's long run")
    parser.add_argument("--didi_steps", type=int, default=None, help="DiDi-Instruct steps")
    parser.add_argument("--sdtt_round", type=int, default=None, help="step-halving steps/round")
    parser.add_argument("--sdtt_divergences", default=None, help="comma-separated divergences")
    parser.add_argument(
        "--limit_samples", type=int, default=8192, help="Monte Carlo samples of the limit row"
    )
    common.add_cache_flag(parser)
    args = parser.parse_args(argv)
    for name in ("teacher_long", "didi_steps", "sdtt_round", "limit_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value}: must be >= 1")
    settings = _settings(args.quick)
    steps = tuple(int(n) for n in (args.steps or settings["steps"]).split(","))
    divergences = [d for d in (args.sdtt_divergences or settings["divergences"]).split(",") if d]
    import jax

    from didistill.distill.teachers.mdlm import load_teacher_denoiser

    common.use_compilation_cache(args.workdir, args.jax_cache)
    start = time.perf_counter()
    teacher = teacher_path(args)
    meta = load_teacher_denoiser(teacher)[2]
    all_steps = (*steps, args.teacher_long)

    didi_steps = args.didi_steps or settings["didi_steps"]
    didi = common.train_run(
        didi_config(teacher, meta, steps, didi_steps), os.path.join(args.workdir, "didi")
    )
    long_report = teacher_samples_report(teacher, args.teacher_long)
    print(f"DiDi-Instruct done ({time.perf_counter() - start:.0f} s)", flush=True)
    source_ppl = didi["source/gen_ppl"]
    rows = [
        {
            "name": "source (exact)",
            "cells": {n: {"gen_ppl": source_ppl, "entropy": didi["data/entropy"]} for n in steps},
        },
        rows_of("MDLM teacher", "teacher", didi, steps),
        rows_of("DiDi-Instruct", "student", didi, steps),
        rows_of("DiDi-Instruct + guided sampler", "student_guided", didi, steps),
    ]
    rows[1]["cells"][args.teacher_long] = long_report
    runs = {"didi": didi, f"teacher_{args.teacher_long}_steps": long_report}
    for divergence in divergences:
        config = sdtt_config(
            teacher, meta, steps, divergence, args.sdtt_round or settings["sdtt_round"]
        )
        results = common.train_run(config, os.path.join(args.workdir, f"sdtt_{divergence}"))
        runs[f"sdtt_{divergence}"] = results
        rows.append(rows_of(f"step halving ({divergence})", "student", results, steps))
        print(f"step halving {divergence} done ({time.perf_counter() - start:.0f} s)", flush=True)

    limit = limit_row(meta, all_steps, args.limit_samples)
    if limit is not None:
        rows.append(limit)
        runs["factorised_limit"] = limit["cells"]
    columns = all_steps
    header = (
        f"{meta['data']['language']}, length {meta['data']['length']}: generative perplexity "
        f"under the exact source (unigram entropy in brackets) against sampler steps; "
        f"DiDi-Instruct {didi_steps} steps; {time.perf_counter() - start:.0f} s on "
        f"{jax.devices()[0].device_kind}. Source: exact perplexity {source_ppl:.2f}."
    )
    report = markdown(rows, columns, header)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"steps": columns, "table": rows, "runs": runs}, f, indent=2, default=float)
    plot(rows[1:], source_ppl, os.path.join(args.workdir, "ppl_vs_steps.png"))
    print(report)
    return {"table": rows, "runs": runs, "teacher": teacher}


if __name__ == "__main__":
    common.quiet_logs()
    main()
