"""How `ctxpeft serve --ray` divides a cluster's CPUs (service.scaleout.sizing): the figures of
docs/OPERATIONS.md, "Scaling out", and the refusals of plans Ray could not schedule."""

from __future__ import annotations

import pytest

from service.jobs.ray_runner import reserved_cpus
from service.scaleout.sizing import INGRESS_CPUS, Unplaceable, place
from service.settings import Settings

JOBS = reserved_cpus(Settings())  # the defaults: jobs on, 1 running x 0.5 CPU


@pytest.mark.parametrize(
    ("nodes", "replicas", "per_replica", "threads", "jobs_off"),
    [
        ([2], 2, 0.5, 1, 0.75),  # this machine: the README's command
        ([4], 2, 1.5, 2, 1.75),
        ([8], 2, 3.5, 4, 3.75),
        ([16], 4, 3.75, 4, 3.87),
        ([8, 8, 8], 6, 3.5, 4, 3.75),  # three nodes: two replicas each, the ingress beside two
        ([8, 8, 4], 5, 3.5, 4, 3.75),  # the small node takes one
        ([64], 8, 7.87, 8, 7.93),
    ],
)
def test_the_replicas_share_what_the_ingress_and_the_jobs_leave(
    nodes: list[float], replicas: int, per_replica: float, threads: int, jobs_off: float
) -> None:
    assert JOBS == 0.5
    plan = place(nodes, replicas, reserved_cpus=JOBS)
    assert (plan.cpus_per_replica, plan.torch_threads, plan.derived) == (
        per_replica,
        threads,
        True,
    )
    # It fits (one more hundredth would not): the replicas, the ingress and the jobs.
    assert plan.replicas * per_replica + INGRESS_CPUS + JOBS <= sum(nodes)
    with pytest.raises(Unplaceable):
        place(nodes, replicas, round(per_replica + 0.01, 2), reserved_cpus=JOBS)
    # With jobs_enabled false the replicas also share what the jobs would keep.
    off = reserved_cpus(Settings(jobs_enabled=False))
    assert place(nodes, replicas, reserved_cpus=off).cpus_per_replica == jobs_off


def test_the_jobs_reserve_is_kept_on_the_ingress_node() -> None:
    """Two 1-CPU nodes: the ingress (0.5) and 0.5 for jobs fill one, so one 1-CPU replica
    fits (on the other), not two; without jobs the first node's half holds a 0.5 replica."""
    assert place([1, 1], 1, cpus_per_replica=1, reserved_cpus=0.5).replicas == 1
    with pytest.raises(Unplaceable, match=r"with fine-tuning jobs \(0\.5 CPU\).*room for 1 "):
        place([1, 1], 2, cpus_per_replica=1, reserved_cpus=0.5)
    assert place([1, 1], 2, reserved_cpus=0.0).cpus_per_replica == 0.5


def test_a_machine_the_jobs_reserve_fills_says_which_settings_to_lower() -> None:
    with pytest.raises(Unplaceable) as refused:
        place([1], 2, reserved_cpus=0.5)
    assert str(refused.value) == (
        "cannot place 2 engine replicas and the ingress (0.5 CPU) with fine-tuning jobs "
        "(0.5 CPU) on 1 CPU (1 node): each replica would get less than 0.1 CPU. Set "
        "jobs_ray_cpus or jobs_max_running lower (or jobs_enabled false), or run on a bigger "
        'cluster (--address; docs/OPERATIONS.md, "Scaling out")'
    )
    assert place([1], 2).cpus_per_replica == 0.25  # jobs off: the ingress leaves 0.5


def test_a_size_that_fits_is_kept_as_asked() -> None:
    plan = place([8, 8], 4, cpus_per_replica=2)
    assert (plan.cpus_per_replica, plan.torch_threads, plan.derived) == (2, 2, False)
    assert place([8], 4, cpus_per_replica=0.5).torch_threads == 1  # at least one


def test_replicas_are_whole_on_a_node() -> None:
    """16 CPUs less the ingress's half would hold 5 replicas of 3 CPUs, but a replica is never
    split between nodes: each 8-CPU node holds 2, so 4 fit, not 5."""
    assert place([8, 8], 4, cpus_per_replica=3).replicas == 4
    with pytest.raises(
        Unplaceable, match=r"room for 4 such replicas\. Pass --cpus-per-replica 2\.66"
    ):
        place([8, 8], 5, cpus_per_replica=3)


def test_an_unplaceable_size_names_what_was_asked_what_the_cluster_has_and_what_fits() -> None:
    with pytest.raises(Unplaceable) as refused:
        place([2], 2, cpus_per_replica=2, reserved_cpus=JOBS)
    assert str(refused.value) == (
        "cannot place 2 engine replicas of 2 CPUs each and the ingress (0.5 CPU) with "
        "fine-tuning jobs (0.5 CPU): the Ray cluster has 2 CPUs (1 node), room for 0 such "
        "replicas. Pass --cpus-per-replica 0.5 or less (or leave it out: it is derived from "
        "the cluster), fewer --replicas, or run on a bigger cluster (--address; "
        'docs/OPERATIONS.md, "Scaling out")'
    )
    with pytest.raises(Unplaceable, match=r"3 nodes: 4\+4\+2"):
        place([4, 4, 2], 3, cpus_per_replica=4)


def test_too_many_replicas_for_the_cluster_say_how_many_fit() -> None:
    with pytest.raises(Unplaceable, match=r"less than 0\.1 CPU\. Pass --replicas 15 or fewer"):
        place([2], 20)
    with pytest.raises(Unplaceable, match=r"no node of the Ray cluster has 0\.5 CPU free"):
        place([0.25], 1)
