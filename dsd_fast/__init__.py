"""dsd_fast: Denoising Score Distillation, fast and correct."""

__version__ = "0.1.0"
