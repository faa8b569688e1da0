"""The service scaled out on Ray Serve: one ingress (our FastAPI app) in front of N engine
replicas, each owning one `Engine`, routed by adapter (Ray Serve model multiplexing keyed by
the tenant-qualified adapter id `tenant/name`), over one shared adapter store.

    messages.py        what crosses the wire between ingress and replicas (plain, picklable)
    remote_engine.py   RemoteEngine: the engine port of the HTTP app, forwarding rows to replicas
    replica.py         EngineReplica: one Engine per Ray Serve replica, health, metrics target
    ingress.py         Ingress: create_app(settings, engine=RemoteEngine(...)) as the Serve ingress
    application.py     build_app(settings, replicas): the bound Serve application; `serve run`
    sizing.py          how the cluster's CPUs are divided (replicas' share derived, or refused)
    cluster.py         a local Ray cluster on loopback (token auth kept in memory, no file), or
                       a running one joined with --address
    json_stderr.py     every stderr line JSON: Ray's loggers through ours, fd 2 through a pipe
    launch.py          `ctxpeft serve --ray --replicas N`: plan, start, serve, drain on
                       SIGTERM, stop within a bound

Nothing here is imported by the single-process service but sizing.py (plain arithmetic, for
the CLI's defaults): `ray` is an optional extra (`pip install 'ctxpeft[ray]'`), imported only
by replica.py, ingress.py, application.py, cluster.py and launch.py, which only `--ray` (or
`serve run`) loads. docs/ARCHITECTURE.md,
"Scaling out on Ray Serve", gives the design; docs/OPERATIONS.md, "Scaling out", the running.
"""
