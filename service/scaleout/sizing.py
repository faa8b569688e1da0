"""How the Ray cluster's CPUs are divided: the ingress's share first, then the engine replicas'.

    plan = place([2.0], replicas=2)                       # fit the cluster
    plan.cpus_per_replica, plan.torch_threads             # (0.75, 1)
    place([2.0], replicas=2, reserved_cpus=0.5)           # 0.5 each: the jobs' CPUs kept free
    place([2.0], replicas=2, cpus_per_replica=2.0)        # raises Unplaceable (what to pass)
    place([8.0, 8.0, 8.0], replicas=6)                    # 3.75 CPUs each, 4 torch threads

Ray places every actor whole on one node: each engine replica asks for `cpus_per_replica`
CPUs, the ingress for INGRESS_CPUS; Serve's controller and HTTP proxies ask for none.
Fine-tuning jobs (`reserved_cpus`: jobs_max_running x jobs_ray_cpus) run as Ray tasks on the
ingress's node (their folders are in its runtime folder), so their CPUs are kept free there
beside it. A plan fits when, with the ingress and the jobs on some node, the replicas that fit
on the nodes (each node's CPUs left, divided by a replica's, rounded down) add up to
`replicas`. Asked for no size, each
replica gets the largest one (in hundredths of a CPU) that fits: the replicas share what the
ingress leaves. Each replica's engine runs its share, rounded to whole CPUs, as torch threads
(at least one). Sizes are logical CPUs, Ray's bookkeeping: Ray does not pin cores.

Pure arithmetic, no Ray import: the CLI checks a local cluster before it starts one, and the
tests read the figures of docs/OPERATIONS.md ("Scaling out") from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_REPLICAS = 2
# The ingress parses HTTP, checks requests and decodes each image once (remote_engine.py);
# half a CPU on the books leaves the rest of a small machine to the engines.
INGRESS_CPUS = 0.5
# Below this share a replica only takes turns with the others on the same cores: fewer
# replicas would serve as much with less memory (each holds a copy of the backbone).
MIN_CPUS_PER_REPLICA = 0.1
# Ray keeps resource amounts to 4 decimals; we count in those units, so that no rounding of
# a float decides whether a plan fits, and derive sizes in hundredths (they read better).
_UNITS = 10_000
_STEP = _UNITS // 100


class Unplaceable(ValueError):
    """The replicas and the ingress cannot be placed on the cluster; one line that says what
    was asked, what the cluster has and what to pass instead."""


@dataclass(frozen=True)
class Plan:
    replicas: int
    cpus_per_replica: float
    ingress_cpus: float
    nodes: tuple[float, ...]  # CPUs of each node the plan was made for
    derived: bool  # cpus_per_replica came from the cluster (no --cpus-per-replica)
    reserved_cpus: float = 0.0  # kept free beside the ingress for fine-tuning jobs

    @property
    def torch_threads(self) -> int:
        return threads_for(self.cpus_per_replica)

    @property
    def cluster_cpus(self) -> float:
        return sum(self.nodes)


def threads_for(cpus_per_replica: float) -> int:
    """Torch threads of one engine replica: its share rounded to the nearest whole CPU, at
    least one. Nearest, not down: a derived share is whole CPUs less a part of the ingress's
    half, and the ingress mostly waits on sockets, so 1.75 CPUs run 2 threads rather than
    leave most of a core idle."""
    return max(1, math.floor(cpus_per_replica + 0.5))


def place(
    nodes: Sequence[float],
    replicas: int = DEFAULT_REPLICAS,
    cpus_per_replica: float | None = None,
    ingress_cpus: float = INGRESS_CPUS,
    reserved_cpus: float = 0.0,
) -> Plan:
    """The plan for `replicas` engine replicas and the ingress (with `reserved_cpus` for jobs
    beside it) on nodes with these CPUs (free for us), or Unplaceable. `cpus_per_replica`
    None: the largest share that fits."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if reserved_cpus < 0:
        raise ValueError(f"reserved_cpus must be >= 0, got {reserved_cpus}")
    units = [_to_units(cpus) for cpus in nodes]
    ingress = _to_units(ingress_cpus) + _to_units(reserved_cpus)
    front = _front(ingress_cpus, reserved_cpus)
    if not any(u >= ingress for u in units):
        raise Unplaceable(
            f"no node of the Ray cluster has {cpus_text(ingress_cpus + reserved_cpus)} free "
            f"for {front}: the cluster has {describe(nodes)}"
            + (". Set jobs_max_running or jobs_ray_cpus lower" if reserved_cpus else "")
        )
    if cpus_per_replica is not None:
        size = _to_units(cpus_per_replica)
        if size <= 0 or _fitting(units, size, ingress) < replicas:
            raise Unplaceable(
                _too_big(nodes, replicas, cpus_per_replica, ingress_cpus, reserved_cpus)
            )
        return Plan(replicas, cpus_per_replica, ingress_cpus, tuple(nodes), False, reserved_cpus)
    # The largest size in hundredths that fits (fitting is monotone in the size: bisect).
    low, high = _to_units(MIN_CPUS_PER_REPLICA) // _STEP, max(units) // _STEP
    if high < low or _fitting(units, low * _STEP, ingress) < replicas:
        most = _fitting(units, _to_units(MIN_CPUS_PER_REPLICA), ingress)
        fewer = f"Pass --replicas {most} or fewer, " if most else ""
        if reserved_cpus:
            fewer += "set jobs_ray_cpus or jobs_max_running lower (or jobs_enabled false), "
        raise Unplaceable(
            f"cannot place {replicas} engine replicas and {front} "
            f"on {describe(nodes)}: each replica would get less than "
            f"{MIN_CPUS_PER_REPLICA:g} CPU. {fewer.capitalize() if not most else fewer}or run "
            'on a bigger cluster (--address; docs/OPERATIONS.md, "Scaling out")'
        )
    while low < high:
        mid = (low + high + 1) // 2
        if _fitting(units, mid * _STEP, ingress) >= replicas:
            low = mid
        else:
            high = mid - 1
    return Plan(replicas, low / 100, ingress_cpus, tuple(nodes), True, reserved_cpus)


def describe(nodes: Sequence[float]) -> str:
    """'2 CPUs (1 node)', '20 CPUs (3 nodes: 8+8+4)'."""
    total = cpus_text(sum(nodes))
    if len(nodes) == 1:
        return f"{total} (1 node)"
    return f"{total} ({len(nodes)} nodes: {'+'.join(f'{n:g}' for n in nodes)})"


def cpus_text(cpus: float) -> str:
    """'0.5 CPU', '1 CPU', '2 CPUs'."""
    return f"{cpus:g} CPU{'s' if cpus > 1 else ''}"


def _front(ingress_cpus: float, reserved_cpus: float) -> str:
    """'the ingress (0.5 CPU)', 'the ingress (0.5 CPU) with fine-tuning jobs (1 CPU)'."""
    text = f"the ingress ({cpus_text(ingress_cpus)})"
    if reserved_cpus:
        text += f" with fine-tuning jobs ({cpus_text(reserved_cpus)})"
    return text


def _to_units(cpus: float) -> int:
    return math.floor(cpus * _UNITS + 1e-6)


def _fitting(units: Sequence[int], size: int, ingress: int) -> int:
    """How many replicas of `size` fit beside the ingress, placed on its best node."""
    best = 0
    for j, node in enumerate(units):
        if node < ingress:
            continue
        count = sum((u - (ingress if i == j else 0)) // size for i, u in enumerate(units))
        best = max(best, count)
    return best


def _too_big(
    nodes: Sequence[float], replicas: int, asked: float, ingress_cpus: float, reserved: float
) -> str:
    units = [_to_units(cpus) for cpus in nodes]
    front = _to_units(ingress_cpus) + _to_units(reserved)
    fit = _fitting(units, _to_units(asked), front) if asked > 0 else 0
    try:
        largest = place(nodes, replicas, ingress_cpus=ingress_cpus, reserved_cpus=reserved)
        largest_cpus = largest.cpus_per_replica
        options = (
            f"Pass --cpus-per-replica {largest_cpus:g} or less (or leave it out: it is derived from "
            "the cluster), fewer --replicas,"
        )
    except Unplaceable:
        options = "Pass fewer --replicas"
    return (
        f"cannot place {replicas} engine replicas of {cpus_text(asked)} each and "
        f"{_front(ingress_cpus, reserved)}: the Ray cluster has {describe(nodes)}, room for {fit} such "
        f"replicas. {options} or run on a bigger cluster (--address; docs/OPERATIONS.md, "
        '"Scaling out")'
    )
