"""Plain-torch truth for every op: the spec of DESIGN.md as code (CPU-runnable, fp32 and fp64)."""
