"""What natgrad's generic Jacobian-vector product costs, by route.

    python benchmarks/jvp_cost.py [--problem char-gpt] [--rounds 15] [--steps 60]
                                  [--hugging-face]

Measurements on one thread, each taking turns (round-robin) so that machine noise hits the
variants alike, reported as medians of CPU time of this thread (``time.thread_time``,
which other processes on the machine barely disturb) and of wall time:

* ``FunctionalModel.jvp`` for k = 1, 2, 3 tangents on the problem's model and batch (the
  quadratic model's call: k = 2), next to a plain forward (no gradients), by each route:
  ``stacked``, the library's first choice (:mod:`natgrad.curvature.stacked`: the primal once,
  the k tangents together); ``rules``, forward-mode AD one tangent at a time with natgrad's
  forward rules (:mod:`natgrad.curvature.forward_rules`; the route of a model the stacked
  pass does not take, and the library's route before it); ``torch``, the same with PyTorch's
  own rules throughout; and, for k = 2, ``vmap``: ``torch.func.vmap`` over the tangents of
  ``torch.func.jvp`` (measured and not used: slower than ``rules``);
* a whole training step (forward, backward, ``opt.step()``) of ``natgrad.KFAC`` with its
  defaults by the ``stacked`` and ``rules`` routes, and of ``torch.optim.Adam``, as in
  ``benchmarks/step_time.py``;
* with ``--hugging-face``, ``FunctionalModel.jvp`` for k = 1, 2 on Hugging Face's GPT-2 and
  Llama (2 layers, width 64, 16 sequences of 32 tokens, called with keywords), by each
  route.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import natgrad
import natgrad.curvature.model as model_module
from natgrad.bench import PROBLEMS
from natgrad.curvature.model import FunctionalModel, mark_unstacked, product_kernels

SHIPPED = model_module.ForwardRules
ROUTES = ("stacked", "rules", "torch")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def round_robin(variants: dict[str, Callable[[], object]], rounds: int, reps: int,
                warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median per-call CPU and wall milliseconds of each variant, taking turns."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples = {name: ([], []) for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(reps):
                cpu, wall = timed(fn)
                samples[name][0].append(cpu)
                samples[name][1].append(wall)
    return {name: {"cpu_ms": statistics.median(cpu) * 1e3,
                   "wall_ms": statistics.median(wall) * 1e3}
            for name, (cpu, wall) in samples.items()}


def product(fmodel: FunctionalModel, inputs: tuple, tangents: list, route: str
            ) -> Callable[[], object]:
    """One call of the product for k = len(tangents) by ``route``."""
    if route == "stacked":
        return lambda: fmodel.jvp_stacked(inputs, tangents)

    def per_tangent() -> object:
        model_module.ForwardRules = SHIPPED if route == "rules" else contextlib.nullcontext
        try:
            return fmodel._jvp_forward(inputs, tangents)
        finally:
            model_module.ForwardRules = SHIPPED

    return per_tangent


def vmapped(fmodel: FunctionalModel, inputs: tuple, tangents: list) -> Callable[[], object]:
    """``torch.func.vmap`` over the k tangents of ``torch.func.jvp`` (one primal)."""
    params = fmodel.detached_params()
    stacked = tuple(torch.stack(parts) for parts in zip(*tangents, strict=True))

    def outputs(*values: torch.Tensor) -> torch.Tensor:
        return fmodel.outputs(values, inputs, frozen_buffers=True)

    def run() -> object:
        with torch.no_grad(), product_kernels():
            return torch.func.vmap(lambda *t: torch.func.jvp(outputs, params, t))(*stacked)

    return run


def jvp_variants(problem) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    model = problem.build_model()
    data = problem.load(0)
    x = data.x_train[: problem.batch_size]
    fmodel = FunctionalModel(model)
    gen = torch.Generator().manual_seed(1)
    tangents = [[torch.randn(p.shape, generator=gen) for p in fmodel.params] for _ in range(3)]

    def forward() -> None:
        with torch.no_grad():
            model(x)

    variants = {"forward (no grad)": forward}
    for k in (1, 2, 3):
        for route in ROUTES:
            variants[f"jvp k={k} {route}"] = product(fmodel, (x,), tangents[:k], route)
    variants["jvp k=2 vmap"] = vmapped(fmodel, (x,), tangents[:2])
    return variants


def hugging_face_variants() -> dict[str, Callable[[], object]]:
    import transformers

    from natgrad._calls import CallLayout

    configs = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    }
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randint(1, 96, (16, 32), generator=gen), torch.ones(16, 32, dtype=torch.long))
    variants = {}
    for name, (build, config) in configs.items():
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = build(config)
        fmodel = FunctionalModel(model, layout=CallLayout(0, ("input_ids", "attention_mask")))
        tangents = [[torch.randn(p.shape, generator=gen) for p in fmodel.params]
                    for _ in range(2)]

        def forward(fmodel=fmodel) -> None:
            with torch.no_grad():
                fmodel.call(inputs)

        variants[f"{name} forward (no grad)"] = forward
        for k in (1, 2):
            for route in ROUTES:
                variants[f"{name} jvp k={k} {route}"] = product(fmodel, inputs, tangents[:k],
                                                                route)
    return variants


def step_variants(problem, steps: int) -> dict[str, Callable[[], object]]:
    data = problem.load(0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(data.x_train), (problem.batch_size,), generator=gen)
               for _ in range(steps)]
    variants = {}
    for name in ("adam", "kfac stacked", "kfac rules"):
        torch.manual_seed(0)
        model = problem.build_model()
        if name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        else:
            opt = natgrad.KFAC(model, loss=problem.loss)
        if name == "kfac rules":  # the products one tangent at a time
            mark_unstacked(model, "benchmark: the per-tangent route")
        position = iter(range(10**9))

        def step(model=model, opt=opt, position=position) -> None:
            idx = batches[next(position) % len(batches)]
            opt.zero_grad()
            problem.compute_loss(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()

        variants[name] = step
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="char-gpt")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hugging-face", action="store_true",
                        help="also time the product on Hugging Face's GPT-2 and Llama")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    problem = PROBLEMS[args.problem]
    products = round_robin(jvp_variants(problem), args.rounds, reps=3)
    steps = round_robin(step_variants(problem, args.steps), rounds=max(1, args.steps // 10),
                        reps=10, warmup=5)
    if args.hugging_face:
        products.update(round_robin(hugging_face_variants(), args.rounds, reps=3))
    print(f"{args.problem} (1 thread, batch {problem.batch_size}): median per call")
    for name, row in {**products, **steps}.items():
        print(f"  {name:<28} cpu {row['cpu_ms']:7.2f} ms   wall {row['wall_ms']:7.2f} ms")
    adam = steps["adam"]
    for name in ("kfac stacked", "kfac rules"):
        print(f"  {name:<28} {steps[name]['cpu_ms'] / adam['cpu_ms']:5.2f}x Adam (cpu)   "
              f"{steps[name]['wall_ms'] / adam['wall_ms']:5.2f}x Adam (wall)")
    print(json.dumps({"problem": args.problem, "products": products, "steps": steps}))


if __name__ == "__main__":
    main()
