"""Subcommands of the ``dreamblend`` CLI, one module each (see dreamblend_ray/cli.py)."""
