"""Declarative builder for CLIP-family vision encoders on Apache TVM Relax.

import builder
enc = builder.load("artifacts/llava-clip/llvm")
features = enc(pixel_values)  # float32 NCHW numpy -> numpy
"""

__version__ = "0.1.0"

from .errors import ArtifactError  # noqa: E402

__all__ = ["ArtifactError", "Encoder", "load", "__version__"]


def __getattr__(name: str):
    # The runtime (numpy, and TVM when an artifact is loaded) is imported on first use, so
    # that `build --help` and the preset checks import neither.
    if name in ("Encoder", "load"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'builder' has no attribute {name!r}")
