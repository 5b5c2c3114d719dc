"""The one flat registry of block types.

A block registers where it is defined:

    @register("clip_mlp", kind="mlp")
    class CLIPMLP(nn.Module): ...

`kind` is the slot it can fill (a field of `BlocksConfig`, or "activation" for the values of
`model.hidden_act`). Names are unique across kinds, so a preset names a block unambiguously.

The built-in blocks are indexed without importing them: the modules of `builder/blocks` are
read as source, and every `@register(...)` on a top-level class gives an entry with its name,
slot, docstring and class-level constants (`class_tokens = 1`). Checking a preset or listing
blocks therefore needs no TVM. A block's module is imported, and its decorator run, the first
time something needs the class itself (`BlockType.factory`); the decorator then replaces the
indexed entry with the live one. Plugins are imported as before and register live entries.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BuilderError

BUILTIN_PACKAGE = "builder.blocks"


class BlockType:
    """A registered block: its name, slot, where it is defined, and the class (imported on
    first use for built-in blocks indexed from their source)."""

    def __init__(
        self,
        name: str,
        kind: str,
        where: str,
        module: str,
        doc: str,
        attrs: dict[str, Any],
        factory: Callable[..., Any] | None = None,
        path: Path | None = None,
        class_name: str | None = None,
    ):
        self.name, self.kind, self.where, self.module = name, kind, where, module
        self.doc, self.attrs, self._factory, self._path = doc, attrs, factory, path
        self.class_name = class_name

    @property
    def factory(self) -> Callable[..., Any]:
        if self._factory is None:
            # Importing the module runs its decorator, which registers the live entry; the
            # class is then taken from the module by the name the index read.
            cls = getattr(importlib.import_module(self.module), self.class_name or "", None)
            if cls is None:
                raise BuilderError(
                    f"block type {self.name!r}: {self.module} has no class "
                    f"{self.class_name!r} (indexed at {self.where})"
                )
            self._factory = cls
        return self._factory

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else ""

    def attr(self, name: str, default: Any = None) -> Any:
        """A class-level constant of the block (`class_tokens`, `requires_class_token`)."""
        if self._factory is not None:
            return getattr(self._factory, name, default)
        return self.attrs.get(name, default)

    @property
    def file(self) -> Path | None:
        """The source file of the block's module, without importing it."""
        if self._path is not None:
            return self._path
        module = sys.modules.get(self.module)
        if module is not None and getattr(module, "__file__", None):
            return Path(module.__file__).resolve()
        return None

    def __repr__(self) -> str:
        return f"BlockType({self.name!r}, kind={self.kind!r}, where={self.where!r})"


_REGISTRY: dict[str, BlockType] = {}


def register(name: str, *, kind: str) -> Callable[[Any], Any]:
    """Class decorator: register `cls` as block type `name` for slot `kind`."""
    caller = sys._getframe(1)  # the `@register(...)` line
    where = f"{caller.f_globals.get('__name__', '?')}:{caller.f_lineno}"

    def wrap(cls: Any) -> Any:
        old = _REGISTRY.get(name)
        if old is not None and old.where != where:
            raise BuilderError(
                f"block type {name!r} is registered twice: at {old.where} and at {where}"
            )
        doc = inspect.getdoc(cls) or ""
        # A live entry's constants are the class's own attributes (`attr`).
        _REGISTRY[name] = BlockType(name, kind, where, cls.__module__, doc, {}, cls)
        return cls

    return wrap


def index_source(path: Path, module: str) -> list[BlockType]:
    """The `@register(NAME, kind=KIND)` classes at the top level of a module's source, as
    entries to be imported on first use."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            call = _register_call(deco)
            if call is None:
                continue
            name, kind = call
            attrs = {}
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                ):
                    try:
                        value = ast.literal_eval(stmt.value)
                    except ValueError:
                        continue
                    if isinstance(value, bool | int | float | str):
                        attrs[stmt.targets[0].id] = value
            doc = inspect.cleandoc(ast.get_docstring(node, clean=False) or "")
            where = f"{module}:{deco.lineno}"
            found.append(
                BlockType(
                    name, kind, where, module, doc, attrs, path=path.resolve(), class_name=node.name
                )
            )
    return found


def _register_call(deco: ast.expr) -> tuple[str, str] | None:
    if not isinstance(deco, ast.Call):
        return None
    func = deco.func
    called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if called != "register" or len(deco.args) != 1:
        return None
    kinds = [k.value for k in deco.keywords if k.arg == "kind"]
    name = deco.args[0]
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        return None
    if len(kinds) != 1 or not isinstance(kinds[0], ast.Constant):
        return None
    return name.value, kinds[0].value


def _index_builtins() -> None:
    """Index the built-in block modules (when this module is imported: a few milliseconds
    of parsing), unless they are already imported."""
    folder = Path(__file__).resolve().parent / "blocks"
    for path in sorted(folder.glob("*.py")):
        module = f"{BUILTIN_PACKAGE}.{path.stem}"
        if path.stem == "__init__" or module in sys.modules:
            continue
        for block in index_source(path, module):
            old = _REGISTRY.get(block.name)
            if old is not None and old.where != block.where:
                raise BuilderError(
                    f"block type {block.name!r} is registered twice: at {old.where} and at "
                    f"{block.where}"
                )
            _REGISTRY.setdefault(block.name, block)


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
    return int(get(embeddings, "embeddings").attr("class_tokens", 0))


def prefix_tokens(config: Any, blocks: Any) -> int:
    """Tokens before the patches: the embeddings block's class tokens and the family
    config's register tokens."""
    return class_tokens(blocks.embeddings) + config.register_tokens


def create(name: str, kind: str, *args: Any, **kwargs: Any) -> Any:
    return get(name, kind).factory(*args, **kwargs)


_index_builtins()
