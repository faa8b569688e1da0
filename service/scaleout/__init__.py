"""The service scaled out on Ray Serve: one ingress (our FastAPI app) in front of N engine
replicas, each owning one `Engine`, routed by adapter (Ray Serve model multiplexing keyed by
the tenant-qualified adapter id `tenant/name`), over one shared adapter store.

    messages.py        what crosses the wire between ingress and replicas (plain, picklable)
    remote_engine.py   RemoteEngine: the engine port of the HTTP app, forwarding rows to replicas
    replica.py         EngineReplica: one Engine per Ray Serve replica, health, metrics target
    ingress.py         Ingress: create_app(settings, engine=RemoteEngine(...)) as the Serve ingress
    application.py     build_app(settings, replicas): the bound Serve application; `serve run`
    cluster.py         a local Ray cluster on loopback (token auth kept in memory, no file)
    launch.py          `ctxpeft serve --ray --replicas N`: start, serve, drain on SIGTERM, stop

Nothing here is imported by the single-process service: `ray` is an optional extra
(`pip install 'ctxpeft[ray]'`), imported only by replica.py, ingress.py, application.py,
cluster.py and launch.py, which only `--ray` (or `serve run`) loads. docs/ARCHITECTURE.md,
"Scaling out on Ray Serve", gives the design; docs/OPERATIONS.md, "Scaling out", the running.
"""
