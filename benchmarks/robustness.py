"""Do natgrad's defaults reach tuned Adam's target on every bench problem, for several seeds?

    python benchmarks/robustness.py [--seeds 0,1,2] [--problems digits-mlp,...]
                                    [--optimizers KFAC,EKFAC] [--threads 1] [--hparams JSON]

For each problem and seed: tuned Adam (the values ``natgrad bench`` uses) runs its whole
budget on the bench's split, initial weights and minibatch order for that seed; its final
training loss is the target. Then each natgrad optimizer, with no argument but the
problem's loss (``loss=``), trains on the same batches until the training loss (evaluated
every 10 steps) reaches the target, or its budget runs out, or the loss stops being
finite. Printed per run: steps to target (– if never), the ratio of seconds to Adam's, and
how often the optimizer backtracked or rejected a step (``state["natgrad"]``).
PERFORMANCE.md's goal: no divergence in 3 seeds on any problem.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from natgrad.bench import PROBLEMS
from natgrad.bench.optimizers import OPTIMIZERS, load_tuned
from natgrad.bench.results import seconds_to_target, steps_to_target, time_ratio
from natgrad.bench.runner import train_run

EVAL_EVERY = 10
NATGRAD_DEFAULTS = {"KFAC": "kfac", "EKFAC": "ekfac", "NGDCG": "ngdcg"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--optimizers", default="KFAC,EKFAC",
                        help=f"comma-separated, of {sorted(NATGRAD_DEFAULTS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hparams", default="{}", type=json.loads,
                        help='JSON of extra arguments for the natgrad optimizers, e.g. '
                             '\'{"kfac_approx": "reduce"}\' (default: none, the defaults)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    tuned = load_tuned()
    adam = OPTIMIZERS["adam"]
    print("| problem | seed | optimizer | steps to target | s / adam's | backtracked | "
          "rejected | skipped | diverged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.problems.split(","):
        problem = PROBLEMS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            data = problem.load(seed)
            reference = train_run(
                problem, data, adam, adam.hparams(name, tuned), steps=problem.steps,
                eval_every=problem.eval_every(problem.steps), seed=seed,
            )
            target = reference.curve.final_loss
            adam_seconds = seconds_to_target(reference.curve, target)
            for opt_name in args.optimizers.split(","):
                spec = OPTIMIZERS[NATGRAD_DEFAULTS[opt_name]]
                run = train_run(problem, data, spec, dict(args.hparams), steps=problem.steps,
                                eval_every=EVAL_EVERY, seed=seed, stop_at=target)
                ratio = time_ratio(seconds_to_target(run.curve, target), adam_seconds)
                counts = run.counters
                print(f"| {name} | {seed} | {opt_name} | "
                      f"{steps_to_target(run.curve, target) or '–'} | "
                      f"{'–' if ratio is None else f'{ratio:.2f}'} | "
                      f"{counts.get('backtracked_steps', 0)} | {counts.get('rejected_steps', 0)} | "
                      f"{counts.get('skipped_steps', 0)} | {'yes' if run.diverged else 'no'} |",
                      flush=True)


if __name__ == "__main__":
    main()
