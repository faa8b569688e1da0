"""Sub-commands of the `ctxpeft` CLI, one module each.

Each module exposes `add_arguments(parser)` and `run(args) -> int`; `service.cli` lists them.
A command stops early by raising `service.commands.common.CommandError` (message, exit
status), which `service.cli.main` turns into `error: ...` on stderr, once for every command.
"""
