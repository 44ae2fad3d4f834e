"""Trace the automatic settings of natgrad's defaults step by step on one bench problem.

    python benchmarks/lm_trace.py [--problem char-gpt] [--seed 0] [--optimizer KFAC]
                                  [--hparams JSON] [--every 10] [--profile]

Runs tuned Adam for the problem's budget (its final training loss is the target), then the
natgrad optimizer on the same batches until it reaches the target, printing every
``--every`` steps the chosen lr a, momentum m, damping λ, ρ, the batch loss and the counters
(backtracked, rejected); then steps to target and the mean step time. ``--profile`` prints
torch.profiler's table of the natgrad run (self CPU time, top 25 operators).
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from natgrad.bench import PROBLEMS
from natgrad.bench.optimizers import OPTIMIZERS, load_tuned
from natgrad.bench.results import steps_to_target
from natgrad.bench.runner import train_run

NAMES = {"KFAC": "kfac", "EKFAC": "ekfac"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="char-gpt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", default="KFAC", choices=sorted(NAMES))
    parser.add_argument("--hparams", default="{}", type=json.loads)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    problem = PROBLEMS[args.problem]
    data = problem.load(args.seed)
    adam = OPTIMIZERS["adam"]
    reference = train_run(problem, data, adam, adam.hparams(args.problem, load_tuned()),
                          steps=problem.steps, eval_every=problem.eval_every(problem.steps),
                          seed=args.seed)
    target = reference.curve.final_loss
    spec = OPTIMIZERS[NAMES[args.optimizer]]
    build = spec.build
    rows = []

    def traced(model, loss, hparams):
        opt = build(model, loss, hparams)
        original = opt.step

        def step(closure=None):
            out = original(closure)
            s = opt.global_state
            rows.append((s.get("step"), s.get("lr"), s.get("momentum"), s.get("damping"),
                         s.get("rho"), s.get("backtracked_steps", 0),
                         s.get("rejected_steps", 0)))
            return out

        opt.step = step
        return opt

    object.__setattr__(spec, "build", traced)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) \
        if args.profile else None
    if profiler is not None:
        profiler.__enter__()
    run = train_run(problem, data, spec, dict(args.hparams), steps=problem.steps,
                    eval_every=10, seed=args.seed, stop_at=target)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print("step | lr | momentum | damping | rho | backtracked | rejected")
    for row in rows[:: args.every]:
        print(" | ".join("–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                         for v in row))
    adam_ms = 1000 * sum(reference.step_times) / len(reference.step_times)
    ms = 1000 * sum(run.step_times) / max(len(run.step_times), 1)
    curve = list(zip(run.curve.steps, run.curve.losses, strict=True))[-4:]
    print(json.dumps({"target": target, "steps_to_target": steps_to_target(run.curve, target),
                      "step_ms": ms, "adam_step_ms": adam_ms,
                      "curve": [(s, round(v, 4)) for s, v in curve]}))


if __name__ == "__main__":
    main()
