"""Does `torch.compile` of the adapter arithmetic pay on CPU? (issue 11, item 6)

    python -m benchmarks.compile_lora                 # small and paper widths, one thread

One decode step of one projection with rank-8 LoRA, 32 rows over 16 adapters (2 rows each,
scattered), against the base product alone, three ways:
  eager     what the fast path runs: rows grouped by adapter (gather), one batched shrink
            and one batched expand product, results gathered back, base `addmm_` onto them;
  compiled  the same function through `torch.compile` (inductor, static shapes);
  fused     a compiled gather-multiply-reduce formulation (no batched matmul: inductor
            generates one loop nest per product that reads each row's adapter in place).
Medians of thread CPU time (one torch thread); compile times are printed. The fast path
stays eager unless a compiled variant clearly wins here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

ROWS, UNITS, RANK = 32, 16, 8


def cpu_us(fn: Callable[[], object], calls: int = 300, rounds: int = 7) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(calls):
            fn()
        samples.append((time.thread_time() - started) / calls * 1e6)
    return statistics.median(samples)


def compare(d_in: int, d_out: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, d_in, generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen)
    lora_a = 0.1 * torch.randn(UNITS, d_in, RANK, generator=gen)
    lora_b = 0.1 * torch.randn(UNITS, RANK, d_out, generator=gen)
    unit = (torch.arange(ROWS) * 7) % UNITS
    per_unit = ROWS // UNITS
    counts = [0] * UNITS
    cell_of_row = []
    for u in unit.tolist():
        cell_of_row.append(u * per_unit + counts[u])
        counts[u] += 1
    row_of_cell = [0] * (UNITS * per_unit)
    for row, cell in enumerate(cell_of_row):
        row_of_cell[cell] = row
    cells, rows = torch.tensor(row_of_cell), torch.tensor(cell_of_row)

    def grid(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        grouped = x.index_select(0, cells).view(UNITS, per_unit, -1)
        delta = torch.bmm(torch.bmm(grouped, a), b).view(UNITS * per_unit, -1)
        return torch.addmm(delta.index_select(0, rows), x, w.t())

    def fused(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = (x[:, :, None] * a[unit]).sum(1)
        return torch.mm(x, w.t()) + (h[:, :, None] * b[unit]).sum(1)

    expected = grid(x, weight, lora_a, lora_b)
    out: dict[str, float] = {}
    for name, fn in (("compiled", grid), ("fused", fused)):
        started = time.perf_counter()
        compiled = torch.compile(fn, dynamic=False)
        got = compiled(x, weight, lora_a, lora_b)
        out[f"{name}_compile_s"] = round(time.perf_counter() - started, 1)
        assert float((got - expected).abs().max()) < 1e-4, name
        out[f"{name}_us"] = cpu_us(partial(compiled, x, weight, lora_a, lora_b))
    out["eager_us"] = cpu_us(lambda: grid(x, weight, lora_a, lora_b))
    out["base_us"] = cpu_us(lambda: torch.mm(x, weight.t()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| d_in x d_out | base | eager | compiled (compile s) | fused (compile s) |")
    print("|---|---:|---:|---:|---:|")
    for d_in, d_out in ((256, 256), (256, 1024), (768, 768), (768, 3072)):
        r = compare(d_in, d_out)
        base = r["base_us"]
        print(
            f"| {d_in} x {d_out} | {base:.0f} us | {r['eager_us'] / base:.2f}x | "
            f"{r['compiled_us'] / base:.2f}x ({r['compiled_compile_s']}) | "
            f"{r['fused_us'] / base:.2f}x ({r['fused_compile_s']}) |"
        )
    print(f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
