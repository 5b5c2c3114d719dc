"""Registered block types. Importing this package registers the built-in blocks."""

from . import clip, common, llava  # noqa: F401  (imported to register)
