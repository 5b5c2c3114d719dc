"""The packing read as steps (`builder/targets/cpu/packing_steps.py`), on lifted functions
written by hand in the form the pipeline lowers them to: kernels called with their output
buffers (`outs[j]`, or temporaries from `builtin.alloc_tensor`). A function a step cannot
say has no steps (the builder then packs with the whole call); the steps of the real
pipeline are checked against that call in tests/test_cpu_pipeline.py."""

# ruff: noqa: F722, F821, E501

from __future__ import annotations

from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from builder.targets.cpu.packing_steps import read_steps

F4 = R.Tensor((4,), "float32")


@I.ir_module
class Steps:
    @T.prim_func
    def copy(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    @T.prim_func
    def scale(
        a: T.Buffer((4,), "float32"), s: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")
    ):
        for i in range(4):
            b[i] = a[i] * s[i]

    @R.function(pure=False)
    def forward_transform_params(
        p: R.Tuple(
            R.Tensor((4,), "float32"), R.Tensor((2, 2), "float32"), R.Tensor((4,), "float32")
        ),
        outs: R.Tuple(R.Tensor((4,), "float32")),
    ):
        cls = Steps
        bias = p[0]
        weight = p[1]
        flat = R.reshape(weight, R.shape([4]))
        s = p[2]
        t = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _ = cls.copy(flat, t)
        o = outs[0]
        _1 = cls.scale(t, s, o)
        return (bias, flat, o)


def test_each_result_is_a_parameter_a_view_or_its_kernels():
    assert read_steps(Steps) == [
        {"param": 0},
        {"param": 1, "shape": [4]},
        {
            "calls": [
                {"kernel": "copy", "args": [{"param": 1, "shape": [4]}, {"temp": 0}]},
                {"kernel": "scale", "args": [{"temp": 0}, {"param": 2}, {"result": True}]},
            ],
            "temps": [[[4], "float32"]],
            "shape": [4],
            "dtype": "float32",
        },
    ]


@I.ir_module
class InPlaceFirst:
    @T.prim_func
    def copy(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    @T.prim_func
    def add_into_first(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            a[i] = a[i] + b[i]

    @R.function(pure=False)
    def forward_transform_params(
        p: R.Tuple(R.Tensor((4,), "float32"), R.Tensor((4,), "float32")),
        outs: R.Tuple(R.Tensor((4,), "float32")),
    ):
        cls = InPlaceFirst
        x = p[0]
        y = p[1]
        t0 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _ = cls.copy(x, t0)
        t1 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _1 = cls.copy(y, t1)
        _2 = cls.add_into_first(t0, t1)
        o = outs[0]
        _3 = cls.copy(t0, o)
        return (o,)


def test_a_kernel_writes_the_argument_it_stores_to_wherever_it_is():
    """The buffer a kernel writes is read off its body, not assumed last: an in-place add
    into its first argument is among the calls that make the result."""
    (step,) = read_steps(InPlaceFirst)
    assert [call["kernel"] for call in step["calls"]] == ["copy", "copy", "add_into_first", "copy"]


@I.ir_module
class TwoOutputs:
    @T.prim_func
    def split2(
        a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32"), c: T.Buffer((4,), "float32")
    ):
        for i in range(4):
            b[i] = a[i]
            c[i] = a[i] * T.float32(2)

    @T.prim_func
    def copy(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    @R.function(pure=False)
    def forward_transform_params(
        p: R.Tuple(R.Tensor((4,), "float32")), outs: R.Tuple(R.Tensor((4,), "float32"))
    ):
        cls = TwoOutputs
        x = p[0]
        t0 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        t1 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _ = cls.split2(x, t0, t1)
        o = outs[0]
        _1 = cls.copy(t0, o)
        return (o,)


@I.ir_module
class FromAnotherResult:
    @T.prim_func
    def copy(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    @R.function(pure=False)
    def forward_transform_params(
        p: R.Tuple(R.Tensor((4,), "float32")),
        outs: R.Tuple(R.Tensor((4,), "float32"), R.Tensor((4,), "float32")),
    ):
        cls = FromAnotherResult
        x = p[0]
        o0 = outs[0]
        _ = cls.copy(x, o0)
        o1 = outs[1]
        _1 = cls.copy(o0, o1)
        return (o0, o1)


@I.ir_module
class ReadBeforeWritten:
    @T.prim_func
    def copy(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    @R.function(pure=False)
    def forward_transform_params(
        p: R.Tuple(R.Tensor((4,), "float32")), outs: R.Tuple(R.Tensor((4,), "float32"))
    ):
        cls = ReadBeforeWritten
        t = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        o = outs[0]
        _ = cls.copy(t, o)
        return (o,)


def test_what_a_step_cannot_say_has_no_steps():
    """A kernel with two outputs, a result made from another result, a temporary read
    before anything wrote it: no steps (the whole call packs these)."""
    for mod in (TwoOutputs, FromAnotherResult, ReadBeforeWritten):
        assert read_steps(mod) is None, mod
