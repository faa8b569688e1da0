"""`ctxpeft demo`: build the demo backbone and one public adapter per synthetic task, offline.

Usage:
    ctxpeft demo                 # build what is missing (a second run prints "up to date")
    ctxpeft demo --eval          # then report exact match on 200 held-out images per task
    ctxpeft demo --force         # rebuild the backbone and write new adapter versions

It runs on one CPU thread unless --threads says otherwise: the demo model is so small that
more intra-op threads slow it down (see docs/METHOD.md).

The backbone goes to <runtime-dir>/backbones/demo; the adapters to the store as
public/<task> (describe, colors, count, describe_fr), each written the way `ctxpeft train`
writes a version. The work is done by `adapters.demo.build_demo`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from service.commands.common import (
    CommandError,
    add_common_arguments,
    resolve_common,
    write_adapter_version,
)

if TYPE_CHECKING:
    from adapters.adapter_set import AdapterSet
    from service.store import AdapterStore


class StoreSink:
    """The demo's adapters go to the store as <tenant>/<task>, as `ctxpeft train` writes them."""

    def __init__(self, store: AdapterStore, tenant: str = "public") -> None:
        self.store = store
        self.tenant = tenant

    def current(self, task: str, fingerprint: str) -> str | None:
        from adapters.format import AdapterFormatError, read_config

        ref = self.store.latest(self.tenant, task)
        if ref is None:
            return None
        try:
            config = read_config(self.store.path(ref))
        except AdapterFormatError:
            return None
        return ref.label if config.base_fingerprint == fingerprint else None

    def write(self, task: str, adapter: AdapterSet) -> str:
        return write_adapter_version(self.store, self.tenant, task, adapter).label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--force", action="store_true", help="rebuild everything")
    parser.add_argument(
        "--eval", action="store_true", help="report exact match on 200 held-out images per task"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from adapters.demo import DemoPlan, build_demo
    from service.store import AdapterStore

    if args.backbone not in (None, "demo"):
        raise CommandError("the demo builds the 'demo' backbone; --backbone cannot change it")
    if args.threads is None:
        # The demo's model is tiny: a step is a few milliseconds of small matmuls, where a
        # second intra-op thread costs more in synchronisation than it gains, and under any
        # other load on the machine it spins (measured 10x slower with 2 threads).
        args.threads = 1
    runtime, store_dir, _, device = resolve_common(args)
    plan = DemoPlan()
    plan = dataclasses.replace(plan, adapter=dataclasses.replace(plan.adapter, device=device))
    store = AdapterStore(store_dir)
    report = build_demo(
        runtime, StoreSink(store), plan, force=args.force, progress=not args.no_progress
    )
    if report.up_to_date:
        print(f"demo is up to date: backbone {report.backbone_dir}")
    else:
        print(f"demo built in {report.seconds:.0f}s: backbone {report.backbone_dir}")
    for task, label in report.adapters.items():
        print(f"  {task:12s} {label}")
    if args.eval:
        _evaluate(report.backbone_dir, store, report.adapters, device, not args.no_progress)
    return 0


def _evaluate(
    backbone_dir: object, store: AdapterStore, labels: dict[str, str], device: str, progress: bool
) -> None:
    from pathlib import Path

    from adapters.backbone import Backbone
    from adapters.data.synthetic import SyntheticCaptions
    from adapters.evaluation import evaluate
    from adapters.format import load_adapter
    from adapters.model import ContextPEFTModel
    from adapters.training import encode_source

    backbone = Backbone.load(Path(str(backbone_dir)), device)
    model = ContextPEFTModel(backbone)
    for task in labels:
        ref = store.latest("public", task)
        assert ref is not None
        adapter = load_adapter(store.path(ref), backbone.dims, backbone.fingerprint())
        source = SyntheticCaptions(task, "test", 200, 0, backbone.config.image_size)
        data = encode_source(backbone, source)
        result = evaluate(model, adapter, data, progress=progress)
        print(
            f"  {task:12s} exact match {result.exact_match:.1%} on 200 test images, "
            f"perplexity {result.perplexity:.4f}"
        )
