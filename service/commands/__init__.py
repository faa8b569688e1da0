"""Sub-commands of the `ctxpeft` CLI, one module each.

Each module exposes `add_arguments(parser)` and `run(args) -> int`; `service.cli` lists them.
"""
