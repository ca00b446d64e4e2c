"""The click commands of `dsd-fast generate`, `fid` and `eval`, one module each: they parse and call the library
(generation, evaluation); cli.py registers them."""
