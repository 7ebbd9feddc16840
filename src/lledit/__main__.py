"""`python -m lledit`: the `lledit` command, e.g. under `torchrun -m lledit train ...`."""

from lledit.cli import app

app()
