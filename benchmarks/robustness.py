"""Do natgrad's defaults reach tuned Adam's target on every bench problem, for several seeds?

    python benchmarks/robustness.py [--seeds 0,1,2] [--problems digits-mlp,...]
                                    [--optimizers KFAC,EKFAC] [--threads 1]

For each problem and seed: tuned Adam (the values ``natgrad bench`` uses) runs its whole
budget on the bench's split, initial weights and minibatch order for that seed; its final
training loss is the target. Then each natgrad optimizer, with no argument but the
likelihood, trains on the same batches until the training loss (evaluated every 10 steps)
reaches the target, or its budget runs out, or the loss stops being finite. Printed per
run: steps to target (– if never), the ratio of seconds to Adam's, and how often the
optimizer backtracked or rejected a step (``state["natgrad"]``). PERFORMANCE.md's goal: no
divergence in 3 seeds on any problem.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import natgrad
from natgrad.bench import PROBLEMS
from natgrad.bench.data import batch_indices
from natgrad.bench.optimizers import OPTIMIZERS, load_tuned
from natgrad.bench.results import seconds_to_target
from natgrad.bench.runner import train_run

EVAL_EVERY = 10


def natgrad_run(problem, data, name: str, seed: int, steps: int, target: float) -> dict:
    """Train with ``natgrad.<name>`` defaults until ``target``; steps, seconds, counters."""
    torch.manual_seed(seed)
    model = problem.build_model()
    opt = getattr(natgrad, name)(model, likelihood=problem.likelihood)
    indices = batch_indices(data.num_train, problem.batch_size, steps, seed)
    autoencoder = data.y_train is data.x_train
    elapsed, reached, diverged = 0.0, None, False
    for step in range(1, steps + 1):
        x = data.x_train[indices[step - 1]]
        y = x if autoencoder else data.y_train[indices[step - 1]]
        start = time.perf_counter()
        opt.zero_grad()
        problem.loss(model(x), y).backward()
        opt.step()
        elapsed += time.perf_counter() - start
        if step % EVAL_EVERY == 0:
            loss = problem.dataset_loss(model, data.x_train, data.y_train)
            if not math.isfinite(loss):
                diverged = True
                break
            if loss <= target:
                reached = step
                break
    state = opt.state["natgrad"]
    return {
        "steps": reached, "seconds": elapsed if reached else None, "diverged": diverged,
        "backtracked": state.get("backtracked_steps", 0),
        "rejected": state.get("rejected_steps", 0),
        "skipped": state.get("skipped_steps", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--optimizers", default="KFAC,EKFAC")
    parser.add_argument("--threads", type=int, default=1)
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
                run = natgrad_run(problem, data, opt_name, seed, problem.steps, target)
                ratio = ("–" if run["seconds"] is None or not adam_seconds
                         else f"{run['seconds'] / adam_seconds:.2f}")
                print(f"| {name} | {seed} | {opt_name} | {run['steps'] or '–'} | {ratio} | "
                      f"{run['backtracked']} | {run['rejected']} | {run['skipped']} | "
                      f"{'yes' if run['diverged'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
