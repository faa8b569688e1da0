"""Mixed-batch forward benchmark (issues 2, 11): what serving 16 adapter sets in one batch costs.

    python -m benchmarks.mixed_batch --threads 1     # table on stdout, JSON in benchmarks/results/
    python -m benchmarks.mixed_batch --threads 1 --preset paper --only mixed/row,single/row,base,peft
    python -m benchmarks.mixed_batch --threads 1 --profile   # + torch.profiler of one decode step
    python -m benchmarks.mixed_batch --repeats 40 --device cuda

On a preset's LM (`small` by default, random init), one LM forward of a batch of 32 rows that mixes 16
adapter sets (2 rows each; LoRA rank 8; context-specific: image and text weights), timed in two
phases as `adapters.decoding.generate` runs them:
  prefill  [BOS] + 64 image embeddings + 8 text tokens = 73 positions, into a fresh KV cache;
  decode   one text token per row against a 73-position KV cache.
Each grouping of the gathered product (row: the production layer; segment, token: the
references of `adapters.reference`, whose timed calls include entering `grouped`, about 0.1 ms
on `small`) runs
  mixed    16 sets, and
  single   the same batch with every row on one set (same bank, same code);
against the baselines
  base     the plain Hugging Face LM without adapters, and
  peft     Hugging Face PEFT with the same 16 adapters in one batch (`adapter_names=`).
PEFT has no contexts, so the PEFT comparison uses context-agnostic LoRA on all seven
projections (separate gate/up, as PEFT has them), imported into our bank from PEFT's own saved
folders (`ours-agnostic`): the same adapters, the same weights. The bank pads LoRA to
`max_rank`; `--max-rank` sets it (default 8 = the sets' rank; the service's default is 64,
reported as its own row).

Every variant runs once per round, in a new random order, rounds are repeated, and the median
is reported, with each variant's ratio to the base model computed round by round (median and
range): the variants see the same machine load (the CPU here is shared). Timing excludes the
vision encoder and the connector (identical for every variant). `--profile` adds a
`torch.profiler` table of one decode step (mixed/row and base): which operators dominate.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import DynamicCache

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone, resolve_device
from adapters.bank import AdapterBank
from adapters.config import (
    CONTEXTS,
    LM_MODULES,
    TEXT,
    AdapterConfig,
    ConnectorSpec,
    resolve_targets,
)
from adapters.format import import_peft_lora
from adapters.model import ContextPEFTModel
from adapters.reference import GROUPINGS, Grouping, grouped
from adapters.routing import Routing

ROWS, SETS, RANK, TEXT_TOKENS = 32, 16, 8, 8
RESULTS = Path(__file__).parent / "results"


@dataclass
class Setup:
    """Everything the timed calls need, built once."""

    model: ContextPEFTModel
    base_lm: torch.nn.Module
    peft_model: Any
    banks: dict[str, AdapterBank]  # "specific", "agnostic", "specific-r64"
    prefill: torch.Tensor  # [ROWS, 73, d]
    contexts: torch.Tensor  # [ROWS, 73]
    step: torch.Tensor  # [ROWS, 1, d]
    mixed: torch.Tensor  # slots [ROWS]
    single: torch.Tensor
    adapter_names: list[str]


def _randomise(adapter: AdapterSet, seed: int) -> AdapterSet:
    """Trained-looking LoRA: B away from zero (a fresh set is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.params.items():
            if name.endswith("lora_B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return adapter.eval()


def _peft_with_adapters(base_lm: torch.nn.Module, folder: Path) -> tuple[Any, list[str]]:
    """PEFT LoRA model with SETS agnostic rank-RANK adapters on the seven projections."""
    config = peft.LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=list(LM_MODULES), lora_dropout=0.0
    )
    names = [f"set{i}" for i in range(SETS)]
    model = peft.get_peft_model(copy.deepcopy(base_lm), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder), selected_adapters=names)
    return model.eval(), names


def build(device: torch.device, max_rank: int, preset: str = "small") -> Setup:
    torch.manual_seed(0)
    backbone = Backbone.build(preset, device=str(device))
    base_lm = copy.deepcopy(backbone.lm)
    dims, vision_dim = backbone.dims, backbone.vision_dim
    spec = ConnectorSpec("linear", vision_dim, dims.hidden_size)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, names = _peft_with_adapters(base_lm, Path(tmp))
        agnostic_sets = [
            # save_pretrained puts every adapter but "default" in a sub-folder of its name.
            import_peft_lora(Path(tmp) / name, dims, backbone.fingerprint(), vision_dim)
            for name in names
        ]
    model = ContextPEFTModel(backbone).eval()
    specific_config = AdapterConfig(
        method="lora",
        connector=spec,
        base_fingerprint=backbone.fingerprint(),
        contexts=CONTEXTS,
        rank=RANK,
        targets=resolve_targets("lora", "all"),
        num_layers=dims.num_layers,
    )
    specific_sets = [
        _randomise(AdapterSet.initialise(specific_config, dims, seed=i), 100 + i)
        for i in range(SETS)
    ]
    banks: dict[str, AdapterBank] = {}
    for key, sets, rank in (
        ("specific", specific_sets, max_rank),
        ("agnostic", agnostic_sets, max_rank),
        ("specific-r64", specific_sets, 64),
    ):
        bank = AdapterBank(dims, spec, SETS, rank, device=device)
        for slot, adapter in enumerate(sets):
            bank.load(slot, adapter)
        banks[key] = bank
    peft_model.to(device)

    pixels = torch.randn(ROWS, 3, backbone.config.image_size, backbone.config.image_size)
    mixed = torch.arange(ROWS, device=device) % SETS
    with torch.no_grad():
        image = banks["specific"].connect(backbone.encode_images(pixels), mixed)
        embeds, prefix_ctx = model.prefix(image)
        ids = torch.randint(4, dims.vocab_size, (ROWS, TEXT_TOKENS + 1), device=device)
        text = model.embed_tokens(ids)
    prefill = torch.cat([embeds, text[:, :TEXT_TOKENS]], dim=1)
    contexts = torch.cat([prefix_ctx, torch.full_like(ids[:, :TEXT_TOKENS], TEXT)], dim=1)
    return Setup(
        model=model,
        base_lm=base_lm.eval(),
        peft_model=peft_model,
        banks=banks,
        prefill=prefill.contiguous(),
        contexts=contexts,
        step=text[:, TEXT_TOKENS:].contiguous(),
        mixed=mixed,
        single=torch.zeros(ROWS, dtype=torch.long, device=device),
        adapter_names=[names[int(s)] for s in mixed],
    )


# --- the timed calls ------------------------------------------------------------------------
Call = Callable[[], None]


def without_reset(build: Callable[..., Call], *args: Any) -> tuple[Call, None]:
    """A case whose timed call needs no reset between repeats."""
    return build(*args), None


def _cases(
    s: Setup, wanted: tuple[str, ...] | None = None
) -> dict[tuple[str, str], tuple[Call, Call | None]]:
    """(phase, variant) -> (timed call, untimed reset after it), for the variants whose
    names start with one of `wanted` (all if None)."""
    config = s.model.backbone.lm.config
    prefix_len = s.prefill.shape[1]
    cases: dict[tuple[str, str], tuple[Call, Call | None]] = {}

    def prefill_ours(bank: AdapterBank, slots: torch.Tensor, grouping: Grouping) -> Call:
        def run() -> None:
            cache = DynamicCache(config=config)
            routing = Routing(bank, slots, s.contexts)
            with grouped(s.model, grouping):
                s.model.lm_forward(s.prefill, routing, cache=cache, logits_to_keep=1)

        return run

    def prefill_hf(model: Any, **kwargs: Any) -> Call:
        def run() -> None:
            cache = DynamicCache(config=config)
            model(
                inputs_embeds=s.prefill,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )

        return run

    def decode_ours(
        bank: AdapterBank, slots: torch.Tensor, grouping: Grouping
    ) -> tuple[Call, Call]:
        # The decode steps of a generation share the prefill's routing (its per-row weights
        # are gathered once per batch), so the prefill runs here, untimed, to set it up.
        cache = DynamicCache(config=config)
        routing = Routing(bank, slots, s.contexts)
        with grouped(s.model, grouping):
            s.model.lm_forward(s.prefill, routing, cache=cache, logits_to_keep=1)
        step = routing.step(torch.full((ROWS, 1), TEXT, device=slots.device))

        def run() -> None:
            with grouped(s.model, grouping):
                s.model.lm_forward(s.step, step, cache=cache)

        return run, _rewind(cache, prefix_len)

    def decode_hf(model: Any, **kwargs: Any) -> tuple[Call, Call]:
        cache = DynamicCache(config=config)
        model(
            inputs_embeds=s.prefill,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )

        def run() -> None:
            model(inputs_embeds=s.step, cache=cache, use_cache=True, **kwargs)

        return run, _rewind(cache, prefix_len)

    def add(phase: str, variant: str, build: Callable[[], tuple[Call, Call | None]]) -> None:
        # Decode cases run their (untimed) prefill when built: build only what is timed.
        if wanted is None or variant.startswith(wanted):
            cases[(phase, variant)] = build()

    for grouping in GROUPINGS:
        for variant, bank, slots in (
            ("mixed", "specific", s.mixed),
            ("single", "specific", s.single),
            ("agnostic-mixed", "agnostic", s.mixed),
        ):
            name = f"{variant}/{grouping}"
            args = (s.banks[bank], slots, grouping)
            add("prefill", name, partial(without_reset, prefill_ours, *args))
            add("decode", name, partial(decode_ours, *args))
    r64 = s.banks["specific-r64"]
    add("prefill", "mixed-r64/row", lambda: (prefill_ours(r64, s.mixed, "row"), None))
    add("decode", "mixed-r64/row", lambda: decode_ours(r64, s.mixed, "row"))
    add("prefill", "base", lambda: (prefill_hf(s.base_lm), None))
    add("decode", "base", lambda: decode_hf(s.base_lm))
    names = s.adapter_names
    add("prefill", "peft-mixed", lambda: (prefill_hf(s.peft_model, adapter_names=names), None))
    add("decode", "peft-mixed", lambda: decode_hf(s.peft_model, adapter_names=names))
    one = [s.adapter_names[0]] * ROWS
    add("prefill", "peft-single", lambda: (prefill_hf(s.peft_model, adapter_names=one), None))
    add("decode", "peft-single", lambda: decode_hf(s.peft_model, adapter_names=one))
    return cases


def _rewind(cache: DynamicCache, length: int) -> Call:
    """Drop the decode step's position again, so every repeat decodes at the same length."""

    def reset() -> None:
        cache.crop(-1)
        assert cache.get_seq_length() == length

    return reset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    cases: dict[tuple[str, str], tuple[Call, Call | None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    inner: dict[str, int] | None = None,
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], list[float]]]:
    """Seconds per call, wall clock and this thread's CPU time. Every round runs every case
    once, in a new random order, so load from other processes on a shared machine falls on
    all variants alike; a case of phase p runs inner[p] times per round (averaged). With one
    torch thread all compute runs on this thread, so its CPU time leaves out the time other
    processes hold the core (not their cache and memory traffic)."""
    inner = inner or {}
    wall: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    order = list(cases)
    shuffle = random.Random(0).shuffle
    # One untimed call of each first: lazily gathered weights, allocator warm-up.
    with torch.no_grad():
        for run, reset in cases.values():
            run()
            if reset is not None:
                reset()
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            shuffle(order)
            for key in order:
                run, reset = cases[key]
                calls = inner.get(key[0], 1)
                spent_wall = spent_cpu = 0.0
                for _ in range(calls):
                    _sync(device)
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    run()
                    _sync(device)
                    spent_wall += time.perf_counter() - start
                    spent_cpu += time.thread_time() - start_cpu
                    if reset is not None:
                        reset()
                if round_ >= warmup:
                    wall[key].append(spent_wall / calls)
                    cpu[key].append(spent_cpu / calls)
    return wall, cpu


# --- report --------------------------------------------------------------------------------
def summarise(
    times: dict[tuple[str, str], list[float]], stat: Callable[[list[float]], float]
) -> dict[str, dict[str, float]]:
    """Milliseconds per (phase, variant) under `stat` (median, min)."""
    out: dict[str, dict[str, float]] = {}
    for (phase, variant), values in times.items():
        out.setdefault(phase, {})[variant] = 1000 * stat(values)
    return out


def round_ratios(
    times: dict[tuple[str, str], list[float]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Each variant over the base model, round by round (both ran in the same round):
    median, min and max of the per-round ratios."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (phase, variant), values in times.items():
        base = times.get((phase, "base"))
        if base is None or variant == "base":
            continue
        ratios = [a / b for a, b in zip(values, base, strict=True)]
        out.setdefault(phase, {})[variant] = {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        }
    return out


def profile_decode(s: Setup, variants: tuple[str, ...], steps: int = 5) -> dict[str, str]:
    """torch.profiler tables (self CPU time, top operators) of `steps` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    cases = _cases(s, variants)
    tables = {}
    with torch.no_grad():
        for variant in variants:
            run, reset = cases[("decode", variant)]
            run()
            assert reset is not None
            reset()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    run()
                    reset()
            tables[variant] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return tables


def _cell(value: float | None, unit: str = " ms") -> str:
    return "-" if value is None else (f"{value:.2f}{unit}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def table(ms: dict[str, dict[str, float]]) -> str:
    """Markdown table: one line per (phase, grouping), ratios next to the times."""
    lines = [
        "| phase | path | mixed | single | mixed/single | base | mixed/base "
        "| agnostic mixed | PEFT mixed | PEFT mixed / ours agnostic mixed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("prefill", "decode"):
        m = ms.get(phase, {})
        base, peft_mixed = m.get("base"), m.get("peft-mixed")
        for grouping in GROUPINGS:
            mixed, single = m.get(f"mixed/{grouping}"), m.get(f"single/{grouping}")
            agnostic = m.get(f"agnostic-mixed/{grouping}")
            lines.append(
                f"| {phase} | {grouping} | {_cell(mixed)} | {_cell(single)} "
                f"| {_cell(_ratio(mixed, single), 'x')} | {_cell(base)} "
                f"| {_cell(_ratio(mixed, base), 'x')} | {_cell(agnostic)} | {_cell(peft_mixed)} "
                f"| {_cell(_ratio(peft_mixed, agnostic), 'x')} |"
            )
    lines.append("")
    for phase in ("prefill", "decode"):
        m = ms.get(phase, {})
        r64, single = m.get("mixed-r64/row"), m.get("single/row")
        peft_single, peft_mixed = m.get("peft-single"), m.get("peft-mixed")
        lines.append(
            f"{phase}: bank padded to max_rank 64 (the service default), mixed/row {_cell(r64)} "
            f"= {_cell(_ratio(r64, single), 'x')} single/row; PEFT one adapter {_cell(peft_single)}, "
            f"PEFT mixed/one {_cell(_ratio(peft_mixed, peft_single), 'x')}"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--decode-calls", type=int, default=4, help="decode steps timed per case and round"
    )
    parser.add_argument("--max-rank", type=int, default=RANK)
    parser.add_argument("--preset", default="small", help="backbone preset (small, paper)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default results/mixed_batch_<preset>.json)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile decode steps (mixed/row and base)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--only", default="", help="comma-separated variant prefixes to time (default: all)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    setup = build(device, args.max_rank, args.preset)
    before = machine(device)
    cases = _cases(setup, tuple(args.only.split(",")) if args.only else None)
    times, cpu_times = measure(
        cases, device, args.warmup, args.repeats, {"decode": args.decode_calls}
    )
    ms = summarise(times, statistics.median)
    fastest = summarise(times, min)
    ratios = round_ratios(times)
    cpu_ratios = round_ratios(cpu_times)
    report = table(ms)
    print(report)
    print("\nmin over repeats (less sensitive to other load on the machine):")
    print(table(fastest))
    print("\nper-round ratio to the base model, median [min-max], wall clock | thread CPU time:")
    for phase, variants in ratios.items():
        for variant, r in sorted(variants.items()):
            c = cpu_ratios[phase][variant]
            print(
                f"  {phase:7} {variant:22} {r['median']:.3f}x [{r['min']:.3f}-{r['max']:.3f}]"
                f" | {c['median']:.3f}x [{c['min']:.3f}-{c['max']:.3f}]"
            )
    profiles = {}
    if args.profile:
        profiles = profile_decode(setup, ("mixed/row", "base"))
        for variant, text in profiles.items():
            print(f"\ndecode step profile, {variant}:\n{text}")
    out = args.out or RESULTS / f"mixed_batch_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "mixed_batch",
        "machine": before | {"load_average_after": os.getloadavg()},
        "settings": {
            "preset": args.preset,
            "rows": ROWS,
            "adapter_sets": SETS,
            "rank": RANK,
            "max_rank": args.max_rank,
            "prefill_positions": int(setup.prefill.shape[1]),
            "decode_cache_positions": int(setup.prefill.shape[1]),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "decode_calls_per_round": args.decode_calls,
        },
        "median_ms": ms,
        "min_ms": fastest,
        "ratio_to_base_per_round": ratios,
        "cpu_ratio_to_base_per_round": cpu_ratios,
        "cpu_median_ms": summarise(cpu_times, statistics.median),
        "decode_profile": profiles,
        "samples_ms": {
            f"{phase}:{variant}": [round(1000 * v, 3) for v in values]
            for (phase, variant), values in times.items()
        },
        "table": report,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
