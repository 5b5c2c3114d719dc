"""Declarative builder for CLIP-family vision encoders on Apache TVM Relax.

import builder
enc = builder.load("artifacts/llava-clip/llvm")
features = enc(pixel_values)  # float32 NCHW numpy -> numpy
"""

__version__ = "0.1.0"

from .errors import ArtifactError  # noqa: E402
from .runtime import Encoder, load  # noqa: E402

__all__ = ["ArtifactError", "Encoder", "load", "__version__"]
