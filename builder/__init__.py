"""Declarative builder for CLIP-family vision encoders on Apache TVM Relax.

import builder
enc = builder.load("artifacts/llava-clip/llvm")
features = enc(pixel_values)  # float32 NCHW numpy -> numpy
builder.encode_dataset("artifacts/llava-clip/llvm", ["images/"], "feats/")  # a dataset
"""

__version__ = "0.1.0"

from .errors import ArtifactError  # noqa: E402
from .runtime import Encoder, load  # noqa: E402

__all__ = ["ArtifactError", "Encoder", "encode_dataset", "load", "__version__"]


def __getattr__(name: str):  # noqa: ANN202
    # encode_dataset needs pyarrow (and tvm once it runs): imported on first use only.
    if name == "encode_dataset":
        from .encode import encode_dataset

        return encode_dataset
    raise AttributeError(f"module 'builder' has no attribute {name!r}")
