"""The scheduled CPU compile pipeline (x86 llvm): see `pipeline.py`."""

from .pipeline import compile_cpu

__all__ = ["compile_cpu"]
