"""The packing read as steps (`builder/targets/cpu/packing_steps.py`), on lifted functions
written by hand in the form the pipeline lowers them to: kernels called with their output
buffers (`outs[j]`, or temporaries from `builtin.alloc_tensor`). A function a step cannot
say has no steps (the builder then packs with the whole call); the steps of the real
pipeline are checked against that call in tests/test_cpu_pipeline.py."""

from __future__ import annotations

from tvm.script import from_source

from builder.targets.cpu.packing_steps import read_steps

# The kernels the functions below call, each writing its last argument but `add_into_first`
# (B4: a buffer of 4 float32).
KERNELS = """
    @T.prim_func
    def copy(a: B4, b: B4):
        for i in range(4):
            b[i] = a[i]

    @T.prim_func
    def scale(a: B4, s: B4, b: B4):
        for i in range(4):
            b[i] = a[i] * s[i]

    @T.prim_func
    def split2(a: B4, b: B4, c: B4):
        for i in range(4):
            b[i] = a[i]
            c[i] = a[i] * T.float32(2)

    @T.prim_func
    def add_into_first(a: B4, b: B4):
        for i in range(4):
            a[i] = a[i] + b[i]
""".replace("B4", 'T.Buffer((4,), "float32")')


def lifted(params: str, outs: str, body: str) -> object:
    """A module of KERNELS and a lifted function of `params` and `outs` (tensor shapes,
    ";"-separated) whose bindings are `body`'s lines (`cls` names the module)."""
    p, o = (", ".join(f'R.Tensor({s}, "float32")' for s in x.split(";")) for x in (params, outs))
    lines = "\n".join(f"        {line.strip()}" for line in body.strip().splitlines())
    return from_source(
        "# from tvm.script import ir as I, relax as R, tirx as T\n"
        f"@I.ir_module\nclass M:{KERNELS}\n"
        "    @R.function(pure=False)\n"
        f"    def forward_transform_params(p: R.Tuple({p},), outs: R.Tuple({o},)):\n"
        f"        cls = M\n{lines}\n"
    )


def test_each_result_is_a_parameter_a_view_or_its_kernels():
    mod = lifted(
        "(4,);(2, 2);(4,)",
        "(4,)",
        """
        bias = p[0]
        weight = p[1]
        flat = R.reshape(weight, R.shape([4]))
        s = p[2]
        t = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _ = cls.copy(flat, t)
        o = outs[0]
        _1 = cls.scale(t, s, o)
        return (bias, flat, o)
        """,
    )
    assert read_steps(mod) == [
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


def test_a_kernel_writes_the_argument_it_stores_to_wherever_it_is():
    """The buffer a kernel writes is read off its body, not assumed last: an in-place add
    into its first argument is among the calls that make the result."""
    mod = lifted(
        "(4,);(4,)",
        "(4,)",
        """
        t0 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _ = cls.copy(p[0], t0)
        t1 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _1 = cls.copy(p[1], t1)
        _2 = cls.add_into_first(t0, t1)
        o = outs[0]
        _3 = cls.copy(t0, o)
        return (o,)
        """,
    )
    (step,) = read_steps(mod)
    assert [call["kernel"] for call in step["calls"]] == ["copy", "copy", "add_into_first", "copy"]


def test_what_a_step_cannot_say_has_no_steps():
    """A kernel with two outputs, a result made from another result, a temporary read
    before anything wrote it: no steps (the whole call packs these)."""
    two_outputs = """
        t0 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        t1 = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        _ = cls.split2(p[0], t0, t1)
        o = outs[0]
        _1 = cls.copy(t0, o)
        return (o,)
        """
    from_another_result = """
        o0 = outs[0]
        _ = cls.copy(p[0], o0)
        o1 = outs[1]
        _1 = cls.copy(o0, o1)
        return (o0, o1)
        """
    read_before_written = """
        t = R.builtin.alloc_tensor(R.shape([4]), "float32", 0)
        o = outs[0]
        _ = cls.copy(t, o)
        return (o,)
        """
    assert read_steps(lifted("(4,)", "(4,)", two_outputs)) is None
    assert read_steps(lifted("(4,)", "(4,);(4,)", from_another_result)) is None
    assert read_steps(lifted("(4,)", "(4,)", read_before_written)) is None
