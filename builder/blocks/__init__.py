"""Registered block types. Importing this package registers the built-in blocks."""

from . import clip, common, heads, llava, siglip  # noqa: F401  (imported to register)
