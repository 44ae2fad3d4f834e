"""Would compiling natgrad's own step arithmetic make its step cheaper? (issue #14, part 3)

    python benchmarks/compiled_step.py [--problem digits-mlp] [--steps 150]

HeavyBall compiles its optimizers' building blocks with torch.compile. This measures the same
idea on natgrad's step: K-FAC's per-block preconditioning (G⁻¹ X A⁻¹) and the quadratic model's
inner products as compiled regions (swapped in for the eager functions), against the eager step,
round-robin on the same minibatches with KFAC's defaults, one thread. Printed: median step
times after 20 steps, the first step's time (which includes compilation) and the ratio.
Measured (2-core CPU shared with other jobs, so noisy): digits-mlp 1.04x (150 steps) and
1.5x (60 steps), digits-autoencoder 1.02x, i.e. slower, plus 7-23 s of compilation: the step's
matrix products already run in BLAS and what is left is not worth a graph, so natgrad's step
stays eager.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import Tensor

import natgrad
import natgrad.optim.control as control
from natgrad.bench import PROBLEMS
from natgrad.curvature.kfac import KroneckerBlock


def _precondition(grad_inv: Tensor, input_inv: Tensor, matrix: Tensor) -> Tensor:
    out = grad_inv @ matrix.to(grad_inv.dtype)
    out = out * input_inv if input_inv.dim() == 1 else out @ input_inv
    return out.to(matrix.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    problem = PROBLEMS[args.problem]
    data = problem.load(0)
    compiled_precondition = torch.compile(_precondition, dynamic=False)
    variants = {
        "eager": (KroneckerBlock.precondition, control._dot),
        "compiled": (
            lambda block, matrix, damping: compiled_precondition(
                block.state["grad_inv"], block.state["input_inv"], matrix),
            torch.compile(control._dot, dynamic=False),
        ),
    }
    runs = {}
    for key in variants:
        torch.manual_seed(0)
        model = problem.build_model()
        runs[key] = (model, natgrad.KFAC(model, loss=problem.loss), [])
    gen = torch.Generator().manual_seed(0)
    for _ in range(0, args.steps, 10):
        batches = [torch.randint(0, len(data.x_train), (problem.batch_size,), generator=gen)
                   for _ in range(10)]
        for key, (model, opt, times) in runs.items():
            KroneckerBlock.precondition, control._dot = variants[key]
            for idx in batches:
                begin = time.perf_counter()
                opt.zero_grad()
                problem.compute_loss(model(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
                times.append(time.perf_counter() - begin)
    KroneckerBlock.precondition, control._dot = variants["eager"]
    medians = {}
    for key, (_, _, times) in runs.items():
        medians[key] = statistics.median(times[20:])
        print(f"{key}: median step {medians[key] * 1e3:.2f} ms, first step {times[0]:.2f} s")
    print(f"compiled / eager: {medians['compiled'] / medians['eager']:.3f}")


if __name__ == "__main__":
    main()
