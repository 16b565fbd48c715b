"""The reward-guided sampler's user-set knobs on a finished DiDi-Instruct run (issue 20, part 6).

    .venv/bin/python experiments/didi_guidance_sweep.py [--workdir runs/ppl_table/didi]
        [--steps 16] [--num_samples 512]

Restores the last checkpoint of the `experiments/ppl_table.py` DiDi-Instruct run (student EMA
and discriminator) and samples it with `guided_sampling.guided_sample` at `--steps` steps under
several guidance settings (guidance scale h ramping h0 -> h1 over the tilted half, candidates
`best_of`, re-ranking temperature; 0 = argmax), reporting gen_ppl under the exact source,
unigram entropy and the invalid rate, all on the same sampler key. Nothing is trained: these
are the knobs the DiDi-Instruct paper leaves to the user at sampling time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import common, ppl_table  # noqa: E402

# (name, guidance_scale, guidance_scale_end, best_of, rerank_temperature)
SETTINGS = (
    ("plain (h 0, 1 candidate)", 0.0, 0.0, 1, 1.0),
    ("h 1, 4 candidates, softmax", 1.0, 1.0, 4, 1.0),
    ("h 3, 4 candidates, softmax", 3.0, 3.0, 4, 1.0),
    ("h 10, 4 candidates, softmax", 10.0, 10.0, 4, 1.0),
    ("h 30 -> 40, 4 candidates, softmax (default)", 30.0, 40.0, 4, 1.0),
    ("h 30 -> 40, 4 candidates, argmax", 30.0, 40.0, 4, 0.0),
    ("h 1, 4 candidates, argmax", 1.0, 1.0, 4, 0.0),
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/ppl_table/didi")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--didi_steps", type=int, default=200, help="the run's train.num_steps")
    args = parser.parse_args(argv)
    import jax

    from didistill.distill.discrete import didi
    from didistill.distill.teachers.mdlm import load_teacher_denoiser
    from didistill.eval import text as text_eval
    from didistill.train.loop import load_checkpoint
    from didistill.train.method import Method

    start = time.perf_counter()
    teacher = os.path.join(REPO, ppl_table.SHIPPED_TEACHER)
    meta = load_teacher_denoiser(teacher)[2]
    config = ppl_table.didi_config(teacher, meta, (args.steps,), args.didi_steps)
    config.eval.num_samples = args.num_samples
    run = didi.DiDiInstruct(config)
    method = Method(init=run.init, step=run.step, evaluate=run.evaluate, batches=run.batches,
                    global_batch_size=run.batch_size)  # fmt: skip
    step, state = load_checkpoint(method, config, args.workdir)
    judge = text_eval.exact_judge(run.scaffold.lang)
    student = jax.device_get(state.student_ema)
    rows = {}
    for name, h0, h1, best_of, temperature in SETTINGS:
        config.eval.guided.update(
            guidance_scale=h0, guidance_scale_end=h1, best_of=best_of,
            rerank_temperature=temperature,
        )  # fmt: skip
        run._guided.clear()  # the jitted sampler closes over these settings
        report = run.guided_reports(student, state, judge, jax.random.key(0))
        cell = {k.split("/")[-1]: v for k, v in report.items()}
        rows[name] = cell
        print(f"{name}: gen_ppl {cell['gen_ppl']:.3f} entropy {cell['entropy']:.3f} "
              f"invalid {cell['invalid_rate']:.3f}", flush=True)  # fmt: skip
    out = {"checkpoint_step": step, "steps": args.steps, "rows": rows,
           "seconds": time.perf_counter() - start}  # fmt: skip
    with open(os.path.join(args.workdir, f"guidance_sweep_{args.steps}.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)
    return out


if __name__ == "__main__":
    common.quiet_logs()
    main()
