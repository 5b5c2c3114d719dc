"""The one flat registry of block types.

A block registers where it is defined:

    @register("clip_mlp", kind="mlp")
    class CLIPMLP(nn.Module): ...

`kind` is the slot it can fill (a field of `BlocksConfig`, or "activation" for the values of
`model.hidden_act`). Names are unique across kinds, so a preset names a block unambiguously.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import BuilderError


@dataclass(frozen=True)
class BlockType:
    name: str
    kind: str
    factory: Callable[..., Any]
    where: str  # "module:line" of the definition, for duplicate-name errors

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.factory) or ""
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, BlockType] = {}


def _where(obj: Any) -> str:
    try:
        line = inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        line = 0
    return f"{obj.__module__}:{line}"


def register(name: str, *, kind: str) -> Callable[[Any], Any]:
    """Class decorator: register `cls` as block type `name` for slot `kind`."""

    def wrap(cls: Any) -> Any:
        where = _where(cls)
        old = _REGISTRY.get(name)
        if old is not None and old.where != where:
            raise BuilderError(
                f"block type {name!r} is registered twice: at {old.where} and at {where}"
            )
        _REGISTRY[name] = BlockType(name, kind, cls, where)
        return cls

    return wrap


def names(kind: str | None = None) -> list[str]:
    """Registered names, sorted; only those of `kind` when given."""
    return sorted(n for n, b in _REGISTRY.items() if kind is None or b.kind == kind)


def kinds() -> list[str]:
    return sorted({b.kind for b in _REGISTRY.values()})


def all_blocks() -> list[BlockType]:
    return [_REGISTRY[n] for n in names()]


def close_matches(word: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f", did you mean {found[0]!r}?" if found else ""


def get(name: str, kind: str) -> BlockType:
    """The block type `name`, which must fill slot `kind`."""
    block = _REGISTRY.get(name)
    if block is None:
        known = names(kind)
        raise BuilderError(
            f"unknown {kind} block {name!r}{close_matches(name, known)}; registered: {known}"
        )
    if block.kind != kind:
        raise BuilderError(
            f"block {name!r} is a {block.kind} block, not a {kind} block; "
            f"registered {kind} blocks: {names(kind)}"
        )
    return block


def class_tokens(embeddings: str) -> int:
    """Tokens the embeddings block `embeddings` puts in front of the patches (CLIP's CLS): its
    `class_tokens` class attribute, 0 when it declares none."""
    return int(getattr(get(embeddings, "embeddings").factory, "class_tokens", 0))


def create(name: str, kind: str, *args: Any, **kwargs: Any) -> Any:
    return get(name, kind).factory(*args, **kwargs)
