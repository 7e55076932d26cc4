"""The subcommands of the ``carprune`` command line, one module each.

Each module defines ``NAME``, ``HELP``, ``options() -> list[Option]``, a frozen ``Settings``
dataclass with one field per option, and ``run(settings, ctx, run, mode) -> int``, which turns
the merged settings mapping into ``Settings`` on entry (`carprune.config.settings_object`).
Optional: ``POSITIONAL`` (the setting given without its flag), ``DISTRIBUTED`` (runs under
torchrun), ``CHECKPOINTED`` (SIGTERM/SIGINT stop it at a complete checkpoint, exit code 75).
Modules are registered at the end of `carprune.cli` with `carprune.cli.register_command`.
Option lists, typed settings bases, the run record and the loading helpers they share are in
`_common`.
"""
