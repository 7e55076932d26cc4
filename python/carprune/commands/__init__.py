"""Subcommands of the ``carprune`` command line that live in their own module.

Each module defines ``NAME``, ``HELP``, ``options() -> list[Option]`` and
``run(settings, ctx, run, mode) -> int`` and is registered at the end of `carprune.cli` with
`carprune.cli.register_command`. Shared option lists and helpers come from `carprune.cli`.
"""
