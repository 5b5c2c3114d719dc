"""The kernels' TVMScript text to a PrimFunc: what `tvm.script.from_source` returns, faster.

TVMScript's parser evaluates each expression node by node through Python's `compile` and
`eval`, so a kernel's parse costs in proportion to its text, and a compile parses one text
per kernel shape. Three things of `from_source`'s cost are not the kernel's own
(docs/tvm-notes.md, "Parsing TVMScript"):

* the `T.prim_func(...)` decorator is called during the parse, and each call walks the
  Python stack with `inspect.stack()` (source lookups for every frame), which it only
  needs when it decorates a Python function;
* the text is converted to the parser's AST anew each time, though kernels of one kind
  differ mostly in their integer and float literals;
* the well-formedness check after the parse.

`parse` names each literal (`_lit0`, `_lit1`, ... bound to the same `IntImm` / `FloatImm`
that `T.int64(n)` / `T.float32(x)` evaluate to), so the text without them is one template
for every shape of a kernel, whose AST is kept; it binds the decorator to one made once; and
it skips the check (the kernels are generated, and tests compare this parse with
`from_source`'s, checked, on every kind of kernel). Same values, same evaluation order: the
PrimFunc is structurally equal to `from_source`'s.
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.parser.core import entry
from tvm.script.parser.core.diagnostics import Source
from tvm.script.parser.core.error import ParserError
from tvm.script.parser.core.parser import Parser

_LITERAL = re.compile(r"T\.int64\((\d+)\)|T\.float32\(([-+0-9.e]+)\)")
_DECORATOR = "@T.prim_func("
# The parser reads the decorator's keywords (`private`) from the text, and calls it only for
# its dispatch token: `_tvmscript.prim_func(...)` gives that token without the stack walk.
_OWN_DECORATOR = "@_tvmscript.prim_func("
_DISPATCH = SimpleNamespace(dispatch_token="tirx")
# `T.let[T.<dtype>]`, the annotation of every `let` in the kernels, as one name each
_LET_DTYPES = ("float32", "int64")


class _Template(Source):
    """A template's text with its AST made once (the parser only reads it)."""

    def __init__(self, text: str):
        super().__init__(text)
        self._ast = super().as_ast()

    def as_ast(self):
        return self._ast


@functools.lru_cache(maxsize=512)
def _template(text: str) -> _Template:
    return _Template(text)


@functools.cache
def _globals() -> dict[str, Any]:
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    names = dict(entry._default_globals())  # pylint: disable=protected-access
    names["_tvmscript"] = SimpleNamespace(prim_func=lambda **_: _DISPATCH)
    names.update({f"_let_{d}": T.let[getattr(T, d)] for d in _LET_DTYPES})
    return names


def parse(src: str) -> tirx.PrimFunc:
    """The PrimFunc of one `@T.prim_func` function's text (structurally equal to
    `tvm.script.from_source(src)`)."""
    values: dict[str, Any] = {}

    def name(match: re.Match) -> str:
        key = f"_lit{len(values)}"
        integer, real = match.groups()
        values[key] = (
            tirx.IntImm("int64", int(integer)) if integer else tirx.FloatImm("float32", float(real))
        )
        return key

    text = _LITERAL.sub(name, src).replace(_DECORATOR, _OWN_DECORATOR, 1)
    for d in _LET_DTYPES:
        text = text.replace(f"T.let[T.{d}]", f"_let_{d}")
    parser = Parser(_template(text), {})
    with IRBuilder() as builder:
        try:
            parser.parse(extra_vars={**_globals(), **values})
        except ParserError as err:
            parser.report_error(err.node, err.args[0])
    return builder.get()
