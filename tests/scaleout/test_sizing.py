"""How `ctxpeft serve --ray` divides a cluster's CPUs (service.scaleout.sizing): the figures of
docs/OPERATIONS.md, "Scaling out", and the refusals of plans Ray could not schedule."""

from __future__ import annotations

import pytest

from service.scaleout.sizing import INGRESS_CPUS, Unplaceable, place


@pytest.mark.parametrize(
    ("nodes", "replicas", "per_replica", "threads"),
    [
        ([2], 2, 0.75, 1),  # this machine: the README's command
        ([1], 2, 0.25, 1),
        ([4], 2, 1.75, 2),
        ([8], 2, 3.75, 4),
        ([16], 4, 3.87, 4),
        ([8, 8, 8], 6, 3.75, 4),  # three nodes: two replicas each, the ingress beside two
        ([8, 8, 4], 5, 3.75, 4),  # the small node takes one
        ([64], 8, 7.93, 8),
    ],
)
def test_the_replicas_share_what_the_ingress_leaves(
    nodes: list[float], replicas: int, per_replica: float, threads: int
) -> None:
    plan = place(nodes, replicas)
    assert (plan.cpus_per_replica, plan.torch_threads, plan.derived) == (
        per_replica,
        threads,
        True,
    )
    # It fits (one more hundredth would not): the replicas and the ingress on the nodes.
    assert plan.replicas * per_replica + INGRESS_CPUS <= sum(nodes)
    with pytest.raises(Unplaceable):
        place(nodes, replicas, round(per_replica + 0.01, 2))


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
        place([2], 2, cpus_per_replica=2)
    assert str(refused.value) == (
        "cannot place 2 engine replicas of 2 CPUs each and the ingress (0.5 CPU): the Ray "
        "cluster has 2 CPUs (1 node), room for 0 such replicas. Pass --cpus-per-replica 0.75 "
        "or less (or leave it out: it is derived from the cluster), fewer --replicas, or run "
        'on a bigger cluster (--address; docs/OPERATIONS.md, "Scaling out")'
    )
    with pytest.raises(Unplaceable, match=r"3 nodes: 4\+4\+2"):
        place([4, 4, 2], 3, cpus_per_replica=4)


def test_too_many_replicas_for_the_cluster_say_how_many_fit() -> None:
    with pytest.raises(Unplaceable, match=r"less than 0\.1 CPU\. Pass --replicas 15 or fewer"):
        place([2], 20)
    with pytest.raises(Unplaceable, match=r"no node of the Ray cluster has 0\.5 CPU free"):
        place([0.25], 1)
