"""`python -m carprune ...` (and `torchrun ... -m carprune ...`): the same as the `carprune` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
