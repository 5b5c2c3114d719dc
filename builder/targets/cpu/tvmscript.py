"""The kernels' TVMScript text to a PrimFunc: what `tvm.script.from_source` returns, faster.

TVMScript's parser evaluates each expression node by node through Python's `compile` and
`eval`, so a kernel's parse costs in proportion to its text, and a compile parses one text
per kernel shape. Four things of `from_source`'s cost are not the kernel's own
(docs/tvm-notes.md, "Parsing TVMScript"):

* the `T.prim_func(...)` decorator is called during the parse, and each call walks the
  Python stack with `inspect.stack()` (source lookups for every frame), which it only
  needs when it decorates a Python function;
* the text is converted to the parser's AST anew each time, though kernels of one kind
  differ mostly in their integer and float literals;
* the well-formedness check after the parse;
* the expressions: the stock evaluator names every intermediate value and evaluates each
  node with `compile` and `eval`, after copying the parser's whole variable table.

`parse` names each literal (`_lit0`, `_lit1`, ... bound to the same `IntImm` / `FloatImm`
that `T.int64(n)` / `T.float32(x)` evaluate to), so the text without them is one template
for every shape of a kernel, whose AST is kept; it binds the decorator to one made once; it
skips the check (the kernels are generated, and tests compare this parse with
`from_source`'s, checked, on every kind of kernel); and its parser (`_Parser`) evaluates
expressions with `_Evaluator`, which makes the calls the stock evaluation makes, in its
order, without the `compile`. Same values, same evaluation order: the PrimFunc is
structurally equal to `from_source`'s.
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace
from typing import Any

from tvm import tirx
from tvm.error import DiagnosticError
from tvm.script.ir_builder import IRBuilder
from tvm.script.parser.core import doc, entry
from tvm.script.parser.core.diagnostics import Source
from tvm.script.parser.core.error import ParserError
from tvm.script.parser.core.evaluator import _eval_op, _get_builtin_or_none
from tvm.script.parser.core.parser import Parser, ScriptMacro

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
    parser = _Parser(_template(text), {})
    with IRBuilder() as builder:
        try:
            parser.parse(extra_vars={**_globals(), **values})
        except ParserError as err:
            parser.report_error(err.node, err.args[0])
    return builder.get()


class _Parser(Parser):
    """TVMScript's parser with its expressions evaluated by `_Evaluator`, and assignments
    to one name bound without `compile`."""

    def eval_expr(self, node: doc.Expression | doc.expr, extra_vars: dict | None = None) -> Any:
        try:
            value = _Evaluator(self, extra_vars or {})(node)
        except (ParserError, DiagnosticError):  # reported already
            raise
        except Exception as err:  # as the stock evaluator reports it, at the expression
            self.report_error(node, err)
        return self.annotate_current_source_span(value)

    def eval_assign(self, target: doc.expr, source: Any, bind_value, allow_shadowing=False):
        if not isinstance(target, doc.Name):
            return super().eval_assign(target, source, bind_value, allow_shadowing)
        self.var_table.add(target.id, bind_value(self, target, target.id, source), allow_shadowing)
        return {target.id: source}


def _has_slice(node: doc.AST) -> bool:
    if isinstance(node, doc.Slice):
        return True
    return isinstance(node, doc.Tuple) and any(isinstance(e, doc.Slice) for e in node.elts)


# The operands of the nodes whose operands `x[a:b]` the stock evaluator gives a step of 1
# before evaluating them (`ExprEvaluator._visit_node`).
_OPERANDS = {
    doc.Call: lambda n: n.args,
    doc.BinOp: lambda n: [n.left, n.right],
    doc.UnaryOp: lambda n: [n.operand],
    doc.Compare: lambda n: [n.left, *n.comparators],
}


class _Evaluator:
    """TVMScript's expression evaluation (`ExprEvaluator`), node by node in Python.

    The stock evaluator turns each intermediate value into a name and evaluates every node
    with `compile` and `eval`. This one calls what those evaluations call: the same
    operator dispatch (`_eval_op`) for operators, the objects themselves for calls,
    attributes and subscripts, in the same order. Nodes of other kinds, and calls or
    operators with a sliced operand (which the stock evaluator rewrites first), go to the
    stock evaluator whole. Source spans are not attached to intermediate values."""

    __slots__ = ("extra", "parser")

    def __init__(self, parser: Parser, extra: dict[str, Any]):
        self.parser, self.extra = parser, extra

    def __call__(self, node: doc.AST) -> Any:
        rule = _RULES.get(type(node))
        operands = _OPERANDS.get(type(node))
        sliced = operands is not None and any(
            isinstance(n, doc.Subscript) and _has_slice(n.slice) for n in operands(node)
        )
        if rule is None or sliced:
            return self.stock(node)
        return rule(self, node)

    def stock(self, node: doc.AST) -> Any:
        """`node` evaluated by TVMScript's own evaluator (`Parser.eval_expr`)."""
        return Parser.eval_expr(self.parser, node, self.extra)

    def name(self, node: doc.Name) -> Any:
        """The variable's latest value (`VarTable.get`), unless `extra_vars` has it."""
        name = node.id
        if name in self.extra:
            return self.extra[name]
        stack = self.parser.var_table.name2value.get(name)
        if stack:
            return stack[-1]
        if name == ScriptMacro.parser_object_name:
            return self.parser
        builtin = _get_builtin_or_none(name)
        if builtin is None:
            raise ParserError(node, f"Undefined variable: {node.id}")
        return builtin

    def constant(self, node: doc.Constant) -> Any:
        return node.value

    def attribute(self, node: doc.Attribute) -> Any:
        return getattr(self(node.value), node.attr)

    def call(self, node: doc.Call) -> Any:
        func = self(node.func)
        args: list[Any] = []
        for a in node.args:
            if isinstance(a, doc.Starred):
                args.extend(self(a.value))
            else:
                args.append(self(a))
        kwargs: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:
                kwargs.update(self(kw.value))
            else:
                kwargs[kw.arg] = self(kw.value)
        return func(*args, **kwargs)

    def bin_op(self, node: doc.BinOp) -> Any:
        return _eval_op(node.op, [self(node.left), self(node.right)])

    def unary_op(self, node: doc.UnaryOp) -> Any:
        return _eval_op(node.op, [self(node.operand)])

    def compare(self, node: doc.Compare) -> Any:
        values = [self(node.left), *(self(c) for c in node.comparators)]
        result = None
        for op, lhs, rhs in zip(node.ops, values, values[1:], strict=False):
            one = _eval_op(op, [lhs, rhs])
            result = one if result is None else _eval_op(doc.And(), [result, one])
        return result

    def subscript(self, node: doc.Subscript) -> Any:
        if _has_slice(node.slice):
            return self.stock(node)
        return self(node.value)[self(node.slice)]

    def tuple_(self, node: doc.Tuple) -> Any:
        if any(isinstance(e, doc.Starred) for e in node.elts):
            return self.stock(node)
        return tuple(self(e) for e in node.elts)

    def list_(self, node: doc.List) -> Any:
        if any(isinstance(e, doc.Starred) for e in node.elts):
            return self.stock(node)
        return [self(e) for e in node.elts]

    def dict_(self, node: doc.Dict) -> Any:
        if any(k is None for k in node.keys):
            return self.stock(node)
        keys = [self(k) for k in node.keys]  # all keys, then all values: the stock order
        return dict(zip(keys, [self(v) for v in node.values], strict=True))


_RULES = {
    doc.Name: _Evaluator.name,
    doc.Constant: _Evaluator.constant,
    doc.Attribute: _Evaluator.attribute,
    doc.Call: _Evaluator.call,
    doc.BinOp: _Evaluator.bin_op,
    doc.UnaryOp: _Evaluator.unary_op,
    doc.Compare: _Evaluator.compare,
    doc.Subscript: _Evaluator.subscript,
    doc.Tuple: _Evaluator.tuple_,
    doc.List: _Evaluator.list_,
    doc.Dict: _Evaluator.dict_,
}
