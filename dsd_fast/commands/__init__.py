"""Evaluation commands of the `dsd-fast` CLI, one module each (generate, fid, eval); cli.py registers them."""
