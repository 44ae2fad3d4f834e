"""natgrad's defaults compiled and in half precision, against eager float32.

    python benchmarks/precision.py [--problems digits-autoencoder,char-gpt] [--seeds 0,1,2]
                                   [--steps 200] [--optimizer KFAC] [--threads 1]
                                   [--device cpu|cuda]

For each problem and seed, ``natgrad.<optimizer>`` with its defaults trains the bench's model on
the bench's split and minibatch order for ``--steps`` steps in each mode:

* ``fp32``: the eager float32 loop (the reference);
* ``compiled``: ``torch.compile(model)`` (default mode) in the same loop;
* ``bf16-autocast``: the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
* ``fp16-scaler``: the forward under fp16 autocast, the loss scaled by a ``GradScaler``;
* ``bf16-params``: the model itself in bf16 (factors and inverses in float32).

Printed: the final training-set loss (float32 evaluation), its relative difference from fp32's, the
median step time after the first 20 steps (compilation excluded) and the one-time cost of the
first step. The CPU autocast kernels are not faster than float32 ones on most CPUs; this
measures the losses, not a speed-up. ``--device cuda`` runs the same on a GPU (the CUDA check
of fp16/bf16, compilation and the fused attention kernels in the training forward: add
``--problems char-gpt``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import natgrad
from natgrad.bench import PROBLEMS
from natgrad.bench.data import batch_indices

MODES = ("fp32", "compiled", "bf16-autocast", "fp16-scaler", "bf16-params")


def run(problem, data, optimizer: str, mode: str, steps: int, seed: int, device: str):
    torch.manual_seed(seed)
    model = problem.build_model().to(device)
    if mode == "bf16-params":
        model = model.to(torch.bfloat16)
    forward = torch.compile(model) if mode == "compiled" else model
    opt = getattr(natgrad, optimizer)(model, loss=problem.loss)
    scaler = torch.amp.GradScaler(device, enabled=mode == "fp16-scaler")
    autocast = {"bf16-autocast": torch.bfloat16, "fp16-scaler": torch.float16}.get(mode)
    x_all, y_all = data.x_train.to(device), data.y_train.to(device)
    if mode == "bf16-params" and x_all.is_floating_point():
        x_all = x_all.to(torch.bfloat16)
    times = []
    for idx in batch_indices(len(x_all), problem.batch_size, steps, seed).to(device):
        begin = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device, dtype=autocast or torch.bfloat16,
                            enabled=autocast is not None):
            out = forward(x_all[idx])
        loss = problem.compute_loss(out.float(), y_all[idx])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    x_train = data.x_train.to(device)
    with torch.no_grad():
        final = problem.dataset_loss(model.float(), x_train.float()
                                     if x_train.is_floating_point() else x_train,
                                     data.y_train.to(device))
    return final, statistics.median(times[20:]) * 1e3, times[0], opt.state["natgrad"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="digits-autoencoder,char-gpt")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--optimizer", default="KFAC")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print("| problem | seed | mode | final loss | vs fp32 | step ms | first step s | skipped |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.problems.split(","):
        problem = PROBLEMS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            data = problem.load(seed)
            reference = None
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                final, step_ms, first, state = run(problem, data, args.optimizer, mode,
                                                   args.steps, seed, args.device)
                reference = final if mode == "fp32" else reference
                delta = ("–" if reference is None or mode == "fp32"
                         else f"{(final - reference) / reference:+.1%}")
                print(f"| {name} | {seed} | {mode} | {final:.4g} | {delta} | {step_ms:.2f} | "
                      f"{first:.2f} | {state['skipped_steps']} |", flush=True)


if __name__ == "__main__":
    main()
