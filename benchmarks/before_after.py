"""Before/after of the method package in one process (issue 11): an older checkout's
`adapters` against this one's, interleaved round by round, on the same backbone weights and
the same adapter sets.

    git worktree add /tmp/ctxpeft-before ca6f7aa      # or: git archive ca6f7aa | tar -x -C DIR
    python -m benchmarks.before_after --before /tmp/ctxpeft-before --preset small
    python -m benchmarks.before_after --before /tmp/ctxpeft-before --preset paper --rounds 8

The older `adapters` package is copied to a temporary folder under the name
`adapters_before` (its own imports rewritten) and imported next to this one. Both inject
their context layers into copies of one backbone; 32 rows over 16 rank-8 context-specific
LoRA sets (all targets, 2 rows each) run
  prefill  [BOS] + 64 image embeddings + 8 text tokens, into a fresh KV cache;
  decode   one text token per row against that cache (4 steps per round, cache rewound);
each round runs base (the plain Hugging Face LM), before and after once, in a new random
order. Reported: each one's ratio to base, and after/before, per round (median, min, max),
in wall clock and in this thread's CPU time (one torch thread: all compute runs on it).
Results: stdout and benchmarks/results/before_after_<preset>.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import DynamicCache

from adapters.adapter_set import AdapterSet, tensor_shapes
from adapters.backbone import Backbone
from adapters.bank import AdapterBank
from adapters.config import TEXT, AdapterConfig, ConnectorSpec, resolve_targets
from adapters.model import ContextPEFTModel
from adapters.routing import Routing

ROWS, SETS, RANK, TEXT_TOKENS = 32, 16, 8, 8
RESULTS = Path(__file__).parent / "results"
Call = Callable[[], None]


def import_before(checkout: Path, work: Path) -> dict[str, ModuleType]:
    """The older checkout's `adapters` as `adapters_before` (imports rewritten)."""
    target = work / "adapters_before"
    shutil.copytree(checkout / "adapters", target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\b(from|import) adapters\b", r"\1 adapters_before", text))
    sys.path.insert(0, str(work))
    names = ("adapter_set", "bank", "config", "model", "routing")
    return {name: importlib.import_module(f"adapters_before.{name}") for name in names}


def build(preset: str, old: dict[str, ModuleType]) -> dict[str, Any]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = Backbone.build(preset)
    base_lm = copy.deepcopy(backbone.lm).eval()
    dims = backbone.dims
    spec = ConnectorSpec("linear", backbone.vision_dim, dims.hidden_size)
    config = AdapterConfig(
        method="lora",
        connector=spec,
        base_fingerprint=backbone.fingerprint(),
        rank=RANK,
        targets=resolve_targets("lora", "all"),
        num_layers=dims.num_layers,
    )
    old_config = old["config"].AdapterConfig.from_dict(config.to_dict())
    old_spec = old["config"].ConnectorSpec(**vars(spec))
    before_model = old["model"].ContextPEFTModel(copy.deepcopy(backbone)).eval()
    after_model = ContextPEFTModel(backbone).eval()
    before_bank = old["bank"].AdapterBank(dims, old_spec, SETS, RANK)
    after_bank = AdapterBank(dims, spec, SETS, RANK)
    gen = torch.Generator().manual_seed(1)
    for slot in range(SETS):
        tensors = {
            name: torch.randn(shape, generator=gen) * (0.02 if "lora_B" in name else 0.05)
            for name, shape in tensor_shapes(config, dims).items()
        }
        after_bank.load(slot, AdapterSet(config, dims, tensors))
        before_bank.load(slot, old["adapter_set"].AdapterSet(old_config, dims, tensors))
    slots = torch.arange(ROWS) % SETS
    with torch.no_grad():
        image = after_bank.connect(torch.randn(ROWS, 64, backbone.vision_dim, generator=gen), slots)
        embeds, prefix_contexts = after_model.prefix(image)
        ids = torch.randint(4, dims.vocab_size, (ROWS, TEXT_TOKENS + 1), generator=gen)
        text = after_model.embed_tokens(ids)
    return {
        "config": backbone.lm.config,
        "base": base_lm,
        "models": {"before": before_model, "after": after_model},
        "routings": {"before": old["routing"].Routing, "after": Routing},
        "banks": {"before": before_bank, "after": after_bank},
        "slots": slots,
        "prefill": torch.cat([embeds, text[:, :TEXT_TOKENS]], 1).contiguous(),
        "contexts": torch.cat([prefix_contexts, torch.full((ROWS, TEXT_TOKENS), TEXT)], 1),
        "step": text[:, TEXT_TOKENS:].contiguous(),
    }


def _cache_kw(model: Any, cache: Any) -> dict[str, Any]:
    """The KV-cache keyword of a checkout's `lm_forward`: `cache` now, `past_key_values` in
    checkouts from before transformers 5.24's rename."""
    names = inspect.signature(model.lm_forward).parameters
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}


def cases(s: dict[str, Any]) -> dict[tuple[str, str], tuple[Call, Call | None]]:
    config, prefill, step = s["config"], s["prefill"], s["step"]
    out: dict[tuple[str, str], tuple[Call, Call | None]] = {}

    def base_prefill() -> None:
        cache = DynamicCache(config=config)
        s["base"](inputs_embeds=prefill, cache=cache, use_cache=True, logits_to_keep=1)

    base_cache = DynamicCache(config=config)
    s["base"](inputs_embeds=prefill, cache=base_cache, use_cache=True)

    def base_decode() -> None:
        s["base"](inputs_embeds=step, cache=base_cache, use_cache=True)

    out[("prefill", "base")] = (base_prefill, None)
    out[("decode", "base")] = (base_decode, lambda: base_cache.crop(-1))
    for version in ("before", "after"):
        model, routing_cls, bank = s["models"][version], s["routings"][version], s["banks"][version]

        def run_prefill(m: Any = model, r: Any = routing_cls, b: Any = bank) -> None:
            cache = DynamicCache(config=config)
            routing = r(b, s["slots"], s["contexts"])
            m.lm_forward(prefill, routing, **_cache_kw(m, cache), logits_to_keep=1)

        cache = DynamicCache(config=config)
        routing = routing_cls(bank, s["slots"], s["contexts"])
        model.lm_forward(prefill, routing, **_cache_kw(model, cache), logits_to_keep=1)
        decode_routing = routing.step(torch.full((ROWS, 1), TEXT))

        def run_decode(m: Any = model, r: Any = decode_routing, c: Any = cache) -> None:
            m.lm_forward(step, r, **_cache_kw(m, c))

        out[("prefill", version)] = (run_prefill, None)
        out[("decode", version)] = (run_decode, partial(cache.crop, -1))
    return out


def measure(
    all_cases: dict[tuple[str, str], tuple[Call, Call | None]], rounds: int, decode_calls: int
) -> dict[str, dict[tuple[str, str], list[float]]]:
    samples: dict[str, dict[tuple[str, str], list[float]]] = {"wall": {}, "cpu": {}}
    order = list(all_cases)
    shuffle = random.Random(0).shuffle
    with torch.no_grad():
        for run, reset in all_cases.values():  # untimed: lazy gathers, allocator warm-up
            run()
            if reset is not None:
                reset()
        for _ in range(rounds):
            shuffle(order)
            for key in order:
                run, reset = all_cases[key]
                calls = decode_calls if key[0] == "decode" else 1
                wall = cpu = 0.0
                for _ in range(calls):
                    w0, c0 = time.perf_counter(), time.thread_time()
                    run()
                    wall += time.perf_counter() - w0
                    cpu += time.thread_time() - c0
                    if reset is not None:
                        reset()
                samples["wall"].setdefault(key, []).append(wall / calls)
                samples["cpu"].setdefault(key, []).append(cpu / calls)
    return samples


def ratio(values: list[float], over: list[float]) -> dict[str, float]:
    per_round = [a / b for a, b in zip(values, over, strict=True)]
    return {
        "median": round(statistics.median(per_round), 3),
        "min": round(min(per_round), 3),
        "max": round(max(per_round), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="older checkout (a folder)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--decode-calls", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ctxpeft-before-") as tmp:
        old = import_before(args.before, Path(tmp))
        setup = build(args.preset, old)
        all_cases = cases(setup)
        samples = measure(all_cases, args.rounds, args.decode_calls)
    report: dict[str, Any] = {}
    print(
        f"{args.preset}: {args.rounds} rounds, load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print("| phase | clock | before / base | after / base | after / before | base ms |")
    print("|---|---|---|---|---|---:|")
    for phase in ("prefill", "decode"):
        for clock in ("cpu", "wall"):
            t = samples[clock]
            base, before, after = t[(phase, "base")], t[(phase, "before")], t[(phase, "after")]
            entry = {
                "before/base": ratio(before, base),
                "after/base": ratio(after, base),
                "after/before": ratio(after, before),
                "base_median_ms": round(1000 * statistics.median(base), 2),
            }
            report[f"{phase}:{clock}"] = entry
            cells = [
                f"{entry[k]['median']:.3f}x [{entry[k]['min']:.2f}-{entry[k]['max']:.2f}]"  # type: ignore[index]
                for k in ("before/base", "after/base", "after/before")
            ]
            print(f"| {phase} | {clock} | {' | '.join(cells)} | {entry['base_median_ms']} |")
    out = args.out or RESULTS / f"before_after_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "before_after",
                "before": str(args.before),
                "preset": args.preset,
                "rounds": args.rounds,
                "rows": ROWS,
                "adapter_sets": SETS,
                "rank": RANK,
                "torch_threads": 1,
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "ratios": report,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
