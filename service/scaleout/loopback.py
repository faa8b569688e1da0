"""Keep every socket of a local Ray cluster on loopback.

`cluster.loopback_environment()` makes Ray take 127.0.0.1 as the node address (its
single-machine mode), so the GCS, raylet, object manager, workers and dashboard agent listen on
127.0.0.1. One listener is left: Ray Serve 2.60 starts each replica's inter-deployment gRPC
server on `[::]:0` (every interface) unconditionally (ray/serve/_private/replica.py,
`_on_initialized`). `bind_replica_grpc_to_node_ip()`, called first in our replicas'
constructors (which Ray runs before `_on_initialized`), makes that server bind the node's
address instead. Serve reaches it at the node address (and only uses it when
RAY_SERVE_USE_GRPC_BY_DEFAULT=1), so nothing else changes. tests/scaleout checks that no
process of the cluster listens beyond loopback, so a Ray upgrade that moves this is noticed.
"""

from __future__ import annotations

from typing import Any

_MARK = "_ctxpeft_node_ip"


def bind_replica_grpc_to_node_ip() -> None:
    """In a Serve replica process: the replica's gRPC server binds the node IP, not [::]."""
    import ray
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, _MARK, False):
        return
    node_ip = ray.util.get_node_ip_address()

    def add_port(server: Any, address: str) -> Any:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0"):
            address = f"{node_ip}:{port}"
        return original(server, address)

    setattr(add_port, _MARK, True)
    replica_module.add_port_to_grpc_server = add_port
