"""Declarative builder for CLIP-family vision encoders on Apache TVM Relax.

import builder
enc = builder.load("artifacts/llava-clip/llvm")
features = enc(pixel_values)  # float32 NCHW numpy -> numpy
builder.encode_dataset("artifacts/llava-clip/llvm", ["images/"], "feats/")  # a dataset
"""

__version__ = "0.1.0"

from .errors import ArtifactError  # noqa: E402

__all__ = ["ArtifactError", "Encoder", "encode_dataset", "load", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `build --help` and the preset checks import none of
    # them: the runtime (numpy, and TVM when an artifact is loaded), and encode_dataset
    # (pyarrow, and TVM once it runs).
    if name in ("Encoder", "load"):
        from . import runtime

        return getattr(runtime, name)
    if name == "encode_dataset":
        from .encode import encode_dataset

        return encode_dataset
    raise AttributeError(f"module 'builder' has no attribute {name!r}")
