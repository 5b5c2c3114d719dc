"""The llvm artifact against PyTorch eager, onnxruntime and OpenVINO, in one process, on one
input.

    python benchmarks/bench_cpu.py [--presets clip-vit-b-16 llava-clip] [--batches 1 8]
                                   [--runs 5] [--seconds 60] [--threads N]
                                   [--out docs/benchmarks.md] [--no-half]
                                   [--multi-crop PRESET [KEY=VALUE ...]]
                                   [--multi-crop-out docs/benchmarks-vlm.md]

For each preset and batch: the artifact built by the builder (random init: the weights do not
change the time), HF `CLIPVisionModel` with the same config cut to the layers the artifact
computes (PyTorch eager, `torch.inference_mode`, same thread count), that HF model
exported to ONNX and run by onnxruntime, and converted by `ov.convert_model` and run by
OpenVINO's CPU plugin with the float32 inference-precision hint and, where its default
precision on this CPU is another (bfloat16 with AVX-512 BF16), at that default (same thread
count). After one warm-up call each, the runners take turns, round after round, the first
runner rotating: at least `--runs` rounds, and more until `--seconds` have passed. A slow
spell of the machine so falls on all of them alike; each call starts 0.2 s after the
previous one, once the pool threads of the last runner have stopped spinning. Each time is
the median of its rounds; the ratios to the peers are given both as the ratio of the
medians and as the median of the rounds' ratios (paired: a slow spell that spans a round
cancels). The FMA peak is
measured by `fma_peak.c` on the same threads before and after every preset and around its
kernel breakdown: the table uses the highest sample and reports the range, which shows how
steady the machine was. Also a per-kernel breakdown of the artifact at batch 1 (median of 5
instrumented forwards), its GEMMs also against the FMA samples just around it, and each GEMM
kernel alone against FMA samples taken around its calls. Where the CPU has AVX-512 FP16, a
`precision: float16` artifact of the same preset runs in the same rounds, as one more
runner, with its error against the float32 artifact and its own kernel breakdown; where it
has AVX-512 BF16 instead, a `precision: bfloat16` one, compared with OpenVINO at its default
precision and with the vdpbf16ps peak, measured by the same loop of that instruction
(`fma_peak.c bf16`) at the same moments as the FMA peak. Then a preset with a crop scheme
(`--multi-crop`, a SmolVLM image of 5 crops by default): one image, its crops as one batch,
against one crop of the same tower at batch 1, into its own page (`--multi-crop-out`;
`--presets` with no name runs that alone). Writes Markdown.

Needs the `bench` extras (`pip install '.[bench]'`), and a C
compiler with OpenMP for the FMA peak. Run it on an idle machine: the GEMM and attention
kernels share out their work, but the other kernels split theirs statically across threads,
and a busy core slows them all.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from builder.runtime import available_cores  # noqa: E402  (imports no TVM)


def fma_peak_sampler(threads: int, scratch: Path):
    """A function that measures the FMA peak (GFLOP/s) once more and returns it; with
    `kind="bf16"`, the peak of AVX-512 BF16's vdpbf16ps instead (the same loop of that
    instruction: 64 flops each)."""
    exe = scratch / "fma_peak"
    subprocess.run(
        [
            "cc",
            "-O3",
            "-march=native",
            "-ffp-contract=fast",
            "-fopenmp",
            str(HERE / "fma_peak.c"),
            "-o",
            str(exe),
        ],
        check=True,
    )

    def sample(iterations: int = 100_000_000, kind: str = "fma") -> float:
        out = subprocess.run(
            [str(exe), str(iterations), str(threads), kind],
            check=True,
            capture_output=True,
            text=True,
        )
        return float(out.stdout)

    return sample


# After a parallel call, a runtime's pool threads keep spinning for a while (TVM's for about
# 75 ms by default, OpenMP's for a few ms) and would slow whichever runner comes next.
SETTLE_S = 0.2


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    runs: int,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each function, one per round: the functions are timed in turn, round
    after round (after one warm-up call each) with the first runner rotating, so machine
    noise falls on all of them alike; at least `runs` rounds, more until `seconds` have
    passed. Each call starts `SETTLE_S` after the previous one ended. `clock`: wall time,
    or `time.process_time` for the CPU time of the process's threads."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    start_all = time.perf_counter()
    r = 0
    while r < runs or time.perf_counter() - start_all < seconds:
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(SETTLE_S)
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
        r += 1
    return times


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median over rounds of the round's time ratio: within a round the runners follow
    each other by seconds, so a slow spell of the machine that spans a round cancels."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def hf_model(preset):
    """The preset's HF reference model (its family's), cut to the layers the artifact
    computes, so that both do the same work."""

    import torch

    from builder import families

    model = preset.model
    cut = dataclasses.replace(model, num_hidden_layers=model.num_layers_computed)
    torch.manual_seed(0)
    return families.get(preset.family).reference_model(cut)


def _figure(value: float | None, spec: str) -> str:
    """A table cell: n/a where a runner was not timed."""
    return "n/a" if value is None else format(value, spec)


@dataclasses.dataclass
class Row:
    """One preset at one batch: each runner's times in the same rounds ("artifact", "torch",
    and where they ran "ort", "ov" (OpenVINO, float32 hint), "ov_default" (OpenVINO at its
    default precision), "half", "open_clip"); a runner that did not run gives None."""

    name: str
    batch: int
    work: float  # GFLOP
    times: dict[str, list[float]]
    error: float | None = None  # the 16-bit artifact's, against the float32 one

    def median(self, runner: str) -> float | None:
        return statistics.median(self.times[runner]) if runner in self.times else None

    def ratio(self, runner: str, peer: str) -> float | None:
        """runner's median time over peer's."""
        if runner not in self.times or peer not in self.times:
            return None
        return self.median(runner) / self.median(peer)

    def paired(self, runner: str, peer: str) -> float | None:
        if runner not in self.times or peer not in self.times:
            return None
        return paired_ratio(self.times[runner], self.times[peer])

    def ratio_cells(self, runner: str, peers: tuple[str, ...]) -> str:
        """Table cells: runner's ratio to each peer, then the paired ratios ("n/a" for a
        peer that did not run)."""
        return " | ".join(
            _figure(f(runner, peer), ".2f") for f in (self.ratio, self.paired) for peer in peers
        )


def open_clip_model(preset):
    """open_clip's CLIP with the preset's image tower (its `encode_image`: normalized when the
    preset normalizes), cut to the layers the artifact computes; None for a preset whose
    output is not the embedding of a CLIP tower, or without open_clip installed."""
    model = preset.model
    if preset.family != "clip" or model.output != "embeds" or model.projection_bias:
        return None
    try:
        from tests.peers import open_clip_and_timm

        open_clip, _ = open_clip_and_timm()
    except ImportError as e:
        print(f"no open_clip peer: {e}", file=sys.stderr)
        return None
    import torch

    vision = {
        "width": model.hidden_size,
        "layers": model.num_layers_computed,
        "head_width": model.head_dim,
        "mlp_ratio": model.intermediate_size / model.hidden_size,
        "patch_size": model.patch_size,
        "image_size": model.image_size,
        "no_ln_pre": not model.pre_layernorm,
    }
    text = {"context_length": 2, "vocab_size": 2, "width": 64, "heads": 1, "layers": 1}
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        model.projection_dim, vision, text, quick_gelu=model.hidden_act == "quick_gelu"
    )
    if clip.visual.transformer.resblocks[0].mlp.c_fc.out_features != model.intermediate_size:
        raise ValueError(f"{preset.name}: open_clip's MLP width (int(width x ratio)) differs")
    return clip.eval()


def last_state(hf):
    """The HF model as a module of the pixel values alone that returns the last hidden state:
    what the ONNX export and OpenVINO's conversion trace."""
    import torch

    class LastState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).last_hidden_state

    return LastState(hf)


def onnx_session(hf, model, threads: int, path: Path):
    import onnxruntime as ort
    import torch

    x = torch.zeros(1, 3, model.image_size, model.image_size)
    try:
        with torch.inference_mode():
            torch.onnx.export(
                last_state(hf),
                (x,),
                str(path),
                input_names=["pixel_values"],
                output_names=["features"],
                dynamic_axes={"pixel_values": {0: "b"}},
                opset_version=17,
                dynamo=False,
            )
    except torch.onnx.errors.OnnxExporterError as e:
        # DINOv2's position-grid resize (antialiased bicubic) has no ONNX op at opset 17.
        return None, f"torch.onnx.export fails: {str(e).splitlines()[0]}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), None


def openvino_requests(hf, model, threads: int) -> tuple[dict[str, Callable], str | None]:
    """OpenVINO's CPU plugin running the HF model (`ov.convert_model`, any batch), on
    `threads` threads, one request at a time (latency mode): {"ov": a call with the float32
    inference-precision hint, "ov_default": a call at the plugin's default precision} and
    that default's name (bf16 on a CPU with AVX-512 BF16 or AMX), or ({}, why) without
    OpenVINO."""
    try:
        import openvino as ov
    except ImportError as e:
        return {}, f"no OpenVINO: {e}"
    import torch

    side = model.image_size
    with torch.inference_mode():
        converted = ov.convert_model(
            last_state(hf),
            example_input=torch.zeros(1, 3, side, side),
            input=[ov.PartialShape([-1, 3, side, side])],
        )
    core = ov.Core()
    common = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    calls, default = {}, None
    for name, extra in (("ov", {"INFERENCE_PRECISION_HINT": "f32"}), ("ov_default", {})):
        compiled = core.compile_model(converted, "CPU", {**common, **extra})
        if not extra:
            default = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        request = compiled.create_infer_request()
        calls[name] = lambda x, request=request: request.infer({0: x})
    return calls, default


def kernel_breakdown(encoder, x, forwards: int = 5) -> list[tuple[str, int, float]]:
    """(kernel, calls, seconds) of one forward, from the VM's instrumentation hook: the
    median over `forwards` forwards of each kernel's total."""
    from tvm import relax

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * forwards)
    calls: collections.Counter = collections.Counter()
    started = [0.0]
    run = [0]

    def hook(func, name, before, ret, *args):
        if before:
            started[0] = time.perf_counter()
        else:
            totals[name][run[0]] += time.perf_counter() - started[0]
            if run[0] == 0:
                calls[name] += 1
        return relax.VMInstrumentReturnKind.NO_OP

    encoder.vm.set_instrument(hook)  # stays on: the breakdown is the encoder's last use
    for run[0] in range(forwards):
        encoder(x)
    return sorted(
        ((n, calls[n], statistics.median(ts)) for n, ts in totals.items()), key=lambda r: -r[2]
    )


def first_calls(encoder, x, prefix: str) -> dict[str, tuple]:
    """(function, arguments) of the first call of each kernel named `prefix...` in one
    forward, from the VM's instrumentation hook (the arguments stay alive with the dict)."""
    from tvm import relax

    calls: dict[str, tuple] = {}

    def hook(func, name, before, ret, *args):
        if not before and name.startswith(prefix) and name not in calls:
            calls[name] = (func, args)
        return relax.VMInstrumentReturnKind.NO_OP

    encoder.vm.set_instrument(hook)
    encoder(x)
    return calls


ALONE_WINDOW_S = 0.2  # seconds of calls between two FMA samples


def gemms_alone(encoder, x, sample_peak, rounds: int = 7, window: float = ALONE_WINDOW_S):
    """Each GEMM kernel of one forward, called alone on the arguments of its first call, in
    rounds of `window` seconds of calls between two short FMA peak samples, so each kernel
    is compared with the FMA rate of the same moments: a slow spell of the machine lowers
    both. Rows: (kernel, M, K, N, median GFLOP/s, best GFLOP/s, the median over the rounds
    of the round's median rate over the faster of its two FMA samples)."""
    rows = []
    for name, (func, args) in sorted(first_calls(encoder, x, "gemm").items()):
        (m, k), out = args[0].shape, args[-1].shape[-1]
        # The packed weight's columns: (panels, K, panel width), the last panel padded.
        # SwiGLU's gate and up share one GEMM, whose weight is twice the output wide.
        columns = args[1].shape[0] * args[1].shape[-1]
        n = out * round(columns / out)
        work = 2 * m * k * n / 1e9
        rates, ratios = [], []
        time.sleep(SETTLE_S)
        before = sample_peak(30_000_000)
        for _ in range(rounds):
            round_rates = []
            start = time.perf_counter()
            while time.perf_counter() - start < window:
                t = time.perf_counter()
                func(*args)
                round_rates.append(work / (time.perf_counter() - t))
            rates += round_rates
            time.sleep(SETTLE_S)
            after = sample_peak(30_000_000)  # also the next round's sample before
            # Against the faster of the two samples around the calls: the conservative side.
            ratios.append(statistics.median(round_rates) / max(before, after))
            before = after
        rows.append(
            (name, m, k, n, statistics.median(rates), max(rates), statistics.median(ratios))
        )
    return rows


@dataclasses.dataclass
class Breakdown:
    """One preset's kernels at batch 1: (kernel, calls, seconds) of one forward of each
    artifact, with the peak samples taken just around them."""

    name: str
    preset: object
    gflop: float  # one image's work
    kernels: list[tuple[str, int, float]]
    around: float  # the faster of the FMA samples just before and after `kernels`
    alone: list[tuple]  # `gemms_alone`'s rows
    sixteen_bit_kernels: list[tuple[str, int, float]] | None
    bf16_around: list[float]  # vdpbf16ps samples around those (a bfloat16 artifact only)


def gemm_seconds(kernels: list[tuple[str, int, float]]) -> float:
    """The GEMM kernels' share of a breakdown's seconds."""
    return sum(t for n, _, t in kernels if n.startswith("gemm"))


HALF = "llvm-half"  # the 16-bit artifact's target name


def sixteen_bit_targets(precision: str) -> str:
    return f"targets=[llvm, {{name: {HALF}, kind: llvm, precision: {precision}}}]"


def host_16_bit_precision() -> str | None:
    """The 16-bit precision whose GEMMs this CPU runs natively: float16 (AVX-512 FP16), else
    bfloat16 (AVX-512 BF16), else None."""
    from builder.config import TargetConfig
    from builder.targets import llvm
    from builder.targets.cpu.kernels import bf16_gemms, half_gemms

    target = llvm.tvm_target(TargetConfig())[0]  # the default target: this CPU
    return "float16" if half_gemms(target) else "bfloat16" if bf16_gemms(target) else None


def bench_preset(name: str, args: argparse.Namespace, workdir: Path, sample_peak):
    import numpy as np
    import torch

    import builder
    from builder.build import build
    from builder.preset import load_preset

    half = args.half
    preset = load_preset(name, [sixteen_bit_targets(half)] if half else [])
    model = preset.model
    start = time.perf_counter()
    built = build(preset, workdir, only=["llvm", HALF] if half else ["llvm"])
    note = (
        f"{name}: the artifacts came from the build cache"
        if all(b.cached for b in built)
        else f"{name}: build (random init, compile, weight packing) "
        f"{time.perf_counter() - start:.1f} s" + (", both artifacts" if half else "")
    )
    paths = {b.target: b.path for b in built}
    encoder = builder.load(paths["llvm"], threads=args.threads)
    sixteen_bit_encoder = builder.load(paths[HALF], threads=args.threads) if half else None
    hf = hf_model(preset)
    session, no_onnx = onnx_session(hf, model, args.threads, workdir / f"{name}.onnx")
    if no_onnx:
        note += f"; onnxruntime not timed: {no_onnx}"
    openvino, ov_default = openvino_requests(hf, model, args.threads)
    if not openvino:
        note += f"; OpenVINO not timed: {ov_default}"
        ov_default = None
    elif ov_default == "f32":  # the same as the float32 hint: not timed twice
        del openvino["ov_default"]
    peer = open_clip_model(preset)
    rows = []
    for batch in args.batches:
        shape = (batch, 3, model.image_size, model.image_size)
        x = np.random.default_rng(batch).standard_normal(shape, dtype=np.float32)
        xt = torch.from_numpy(x)

        def eager(xt=xt):
            with torch.inference_mode():
                return hf(pixel_values=xt)

        runners = {"artifact": lambda x=x: encoder(x), "torch": eager}
        if session is not None:
            runners["ort"] = lambda x=x, session=session: session.run(None, {"pixel_values": x})
        if half:
            runners["half"] = lambda x=x: sixteen_bit_encoder(x)
        runners.update({name: lambda x=x, call=call: call(x) for name, call in openvino.items()})
        if peer is not None:

            def open_clip_encode(xt=xt):
                with torch.inference_mode():
                    return peer.encode_image(xt, normalize=model.normalize_embeds)

            runners["open_clip"] = open_clip_encode
        row = Row(
            name,
            batch,
            encoder.manifest["gflop_per_image"] * batch,
            interleaved_times(runners, args.runs, args.seconds),
        )
        if half:
            # Same weights (the same seeded init); the float32 artifact is HF's to ~1e-5.
            full = encoder(x)
            row.error = float(np.abs(sixteen_bit_encoder(x) - full).max() / np.abs(full).max())
        rows.append(row)
        print(
            f"{name} b{batch}: "
            + ", ".join(f"{k} {row.median(k):.3f} s" for k in row.times)
            + f" ({len(row.times['artifact'])} rounds)",
            file=sys.stderr,
        )
    x1 = np.zeros((1, 3, model.image_size, model.image_size), np.float32)
    alone = gemms_alone(encoder, x1, sample_peak)
    time.sleep(SETTLE_S)
    before = sample_peak()
    kernels = kernel_breakdown(encoder, x1)
    time.sleep(SETTLE_S)
    after = sample_peak()
    sixteen_bit_kernels, bf16_around = None, []
    if half:
        bf16_around = [sample_peak(kind="bf16")] if half == "bfloat16" else []
        time.sleep(SETTLE_S)
        sixteen_bit_kernels = kernel_breakdown(sixteen_bit_encoder, x1)
        time.sleep(SETTLE_S)
        bf16_around += [sample_peak(kind="bf16")] if half == "bfloat16" else []
    breakdown = Breakdown(
        name,
        preset,
        encoder.manifest["gflop_per_image"],
        kernels,
        max(before, after),
        alone,
        sixteen_bit_kernels,
        bf16_around,
    )
    return rows, note, breakdown, [before, after], ov_default


# A preset with a crop scheme, and overrides that keep its image to a few crops.
MULTI_CROP = ["smolvlm-256m-instruct", "preprocess.longest_edge=1024"]
# The override that makes a crop scheme's preset one crop per image (the same tower).
ONE_CROP = {
    "dynamic_tiles": "preprocess.crop_to_patches=false",
    "image_splitting": "preprocess.do_image_splitting=false",
}


def bench_crops(spec: list[str], args: argparse.Namespace, workdir: Path) -> list[str]:
    """A multi-crop preset (`spec`: its name and overrides): one image, the most crops its
    scheme cuts as one batch, against the same preset with one crop per image at batch 1,
    interleaved as the runners above. Markdown lines."""
    import numpy as np

    import builder
    from builder.bench import most_crops
    from builder.build import build
    from builder.crops import scheme
    from builder.preset import load_preset

    name, overrides = spec[0], spec[1:]
    preset = load_preset(name, overrides)
    single = load_preset(name, [*overrides, ONE_CROP[scheme(preset.preprocess)]])
    encoders = {}
    for key, p in (("image", preset), ("crop", single)):
        (built,) = build(p, workdir / key, only=["llvm"])
        encoders[key] = builder.load(built.path, threads=args.threads)
    crops = most_crops(encoders["image"])
    side = preset.model.image_size
    rng = np.random.default_rng(0)
    x = {
        k: rng.standard_normal((n, 3, side, side), dtype=np.float32)
        for k, n in (("image", crops), ("crop", 1))
    }
    runners = {k: (lambda k=k: encoders[k](x[k])) for k in encoders}
    per_crop = encoders["crop"].manifest["gflop_per_image"]
    row = Row(
        " ".join(spec), crops, per_crop * crops, interleaved_times(runners, args.runs, args.seconds)
    )
    image, crop = row.median("image"), row.median("crop")
    print(
        f"{row.name}: {image:.3f} s per image of {crops} crops, {crop:.3f} s per crop alone",
        file=sys.stderr,
    )
    return [
        "| preset | crops per image | GFLOP per crop | s per image | s per crop | "
        "one crop, batch 1, s | per crop / one crop | paired | rounds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {row.name} | {crops} | {per_crop:.1f} | {image:.3f} | {image / crops:.3f} | "
        f"{crop:.3f} | {image / crops / crop:.2f} | {row.paired('image', 'crop') / crops:.2f} | "
        f"{len(row.times['image'])} |",
    ]


def multi_crop_page(args: argparse.Namespace, table: list[str]) -> list[str]:
    from tvm.target.codegen import llvm_get_system_cpu

    return [
        "# CPU benchmark: a multi-crop VLM preset",
        "",
        f"Written by `benchmarks/bench_cpu.py` on {datetime.date.today()}: "
        f"{platform.machine()}, LLVM's CPU `{llvm_get_system_cpu()}`, {args.threads} threads, "
        "float32, random init, medians of interleaved rounds after a warm-up. A round times "
        "one image, the most crops its preset's scheme cuts as one batch (as `encode_images` "
        "runs an image), and one crop of the same preset with the scheme off at batch 1. "
        "The paired ratio is the median over rounds of each round's ratio.",
        "",
        *table,
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=["clip-vit-b-16", "llava-clip"])
    parser.add_argument(
        "--multi-crop",
        nargs="*",
        default=MULTI_CROP,
        metavar="PRESET [KEY=VALUE]",
        help="a preset with a crop scheme and overrides, timed per image and per crop "
        "(nothing: skip it)",
    )
    parser.add_argument(
        "--multi-crop-out", type=Path, default=HERE.parent / "docs" / "benchmarks-vlm.md"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=5, help="fewest timed rounds")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="go on with rounds until this much time"
    )
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    parser.add_argument(
        "--no-half",
        dest="half",
        action="store_false",
        help="skip the 16-bit artifact (float16 where the CPU has AVX-512 FP16, else bfloat16 "
        "where it has AVX-512 BF16)",
    )
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    asked_half = args.half
    args.half = host_16_bit_precision() if args.half else None

    import torch
    from tvm.target.codegen import llvm_get_system_cpu

    torch.set_num_threads(args.threads)
    rows, notes, breakdowns = [], [], []
    bf16 = args.half == "bfloat16"
    bf16_peaks: list[float] = []  # vdpbf16ps samples, where the 16-bit artifact is bfloat16
    # The artifacts, ONNX files and the FMA loop's binary: gigabytes for llava-clip.
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as scratch:
        workdir = Path(scratch)
        sample_peak = fma_peak_sampler(args.threads, workdir)

        def samples() -> tuple[list[float], list[float]]:
            fma = [sample_peak() for _ in range(3)]
            return fma, [sample_peak(kind="bf16") for _ in range(3)] if bf16 else []

        peaks, bf16_peaks = samples()
        print(f"FMA peak {max(peaks):.1f} GFLOP/s on {args.threads} threads", file=sys.stderr)
        for name in args.presets:
            preset_rows, note, breakdown, around, ov_default = bench_preset(
                name, args, workdir, sample_peak
            )
            rows += preset_rows
            notes.append(note)
            ov_precision = ov_default
            breakdowns.append(breakdown)
            fma, more = samples()
            peaks += around + fma
            bf16_peaks += breakdown.bf16_around + more
        crop_lines = bench_crops(args.multi_crop, args, workdir) if args.multi_crop else []
    peak = max(peaks)
    bf16_peak = max(bf16_peaks) if bf16_peaks else None

    lines = [
        "# CPU benchmark",
        "",
        f"Written by `benchmarks/bench_cpu.py` on {datetime.date.today()}: "
        f"{platform.machine()}, LLVM's CPU `{llvm_get_system_cpu()}`, {args.threads} threads, "
        "float32, medians of interleaved rounds after a warm-up. FMA peak measured by "
        f"`benchmarks/fma_peak.c`: {peak:.1f} GFLOP/s (the highest of {len(peaks)} samples "
        f"taken through the run; the lowest was {min(peaks):.1f}, the median "
        f"{statistics.median(peaks):.1f}). GFLOP counts the matmuls, attention and "
        "patch conv of the layers computed (llava-clip: 23 of 24).",
        "",
        "| preset | batch | GFLOP | artifact s | PyTorch eager s | onnxruntime s | "
        "OpenVINO f32 s | artifact GFLOP/s | % of FMA peak | vs PyTorch | vs onnxruntime | "
        "vs OpenVINO f32 | vs PyTorch, paired | vs onnxruntime, paired | "
        "vs OpenVINO f32, paired | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = r.median("artifact")
        lines.append(
            f"| {r.name} | {r.batch} | {r.work:.1f} | {ours:.3f} | {r.median('torch'):.3f} | "
            f"{_figure(r.median('ort'), '.3f')} | {_figure(r.median('ov'), '.3f')} | "
            f"{r.work / ours:.1f} | {100 * r.work / ours / peak:.0f}% | "
            + r.ratio_cells("artifact", ("torch", "ort", "ov"))
            + f" | {len(r.times['artifact'])} |"
        )
    lines += [
        "",
        "Ratios are artifact time / peer time: below 1.0 the artifact is faster. The first "
        "three divide the medians; the paired ones are the median over rounds of each round's "
        "ratio (the runners of a round follow each other within seconds, so a slow "
        "spell of the machine that spans a round cancels). OpenVINO runs the same HF model "
        "(`ov.convert_model`, one request at a time, latency mode, the same threads) with "
        "the float32 inference-precision hint.",
        "",
    ]
    open_clip_rows = [r for r in rows if "open_clip" in r.times]
    if open_clip_rows:
        lines += [
            "## open_clip",
            "",
            "Presets whose output is the image embedding, against open_clip's CLIP with the "
            "same image tower (`open_clip.CLIP`, `encode_image`, normalized as the preset "
            "says; PyTorch eager, same threads), timed in the same rounds as the runners "
            "above.",
            "",
            "| preset | batch | artifact s | open_clip s | vs open_clip | vs open_clip, paired |",
            "|---|---|---|---|---|---|",
        ]
        for r in open_clip_rows:
            lines.append(
                f"| {r.name} | {r.batch} | {r.median('artifact'):.3f} | "
                f"{r.median('open_clip'):.3f} | {r.ratio_cells('artifact', ('open_clip',))} |"
            )
        lines.append("")
    if args.half:
        how = {
            "float16": "AVX-512 FP16): the GEMMs multiply float16 operands",
            "bfloat16": "AVX-512 BF16): the GEMMs and attention's Q.K^T and P.V sum "
            "products of bfloat16 operands in float32 (vdpbf16ps), the softmax in float32",
        }[args.half]
        peak_note = (
            f" vdpbf16ps peak measured by `benchmarks/fma_peak.c bf16` (the same loop of "
            f"that instruction): {bf16_peak:.1f} GFLOP/s (the highest of {len(bf16_peaks)} "
            f"samples; the lowest was {min(bf16_peaks):.1f}, the median "
            f"{statistics.median(bf16_peaks):.1f})."
            if bf16_peak
            else ""
        )
        ov = f"OpenVINO {ov_precision or 'default'}"
        lines += [
            f"## The {args.half} artifact",
            "",
            f"`precision: {args.half}` on this CPU ({how}, the rest runs in float32 (see "
            "docs/cpu-pipeline.md). Timed in the same rounds as the runners above; error: "
            f"max |{args.half} - float32 artifact| over max |float32 artifact|, same weights "
            f"and input. {ov}: OpenVINO at its default inference precision on this CPU."
            + peak_note,
            "",
            f"| preset | batch | {args.half} s | {ov} s | GFLOP/s | % of bf16 peak | "
            f"vs float32 artifact | vs PyTorch | vs onnxruntime | vs {ov} | vs float32, paired | "
            f"vs PyTorch, paired | vs onnxruntime, paired | vs {ov}, paired | error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            rate = r.work / r.median("half")
            lines.append(
                f"| {r.name} | {r.batch} | {r.median('half'):.3f} | "
                f"{_figure(r.median('ov_default'), '.3f')} | {rate:.1f} | "
                f"{f'{100 * rate / bf16_peak:.0f}%' if bf16_peak else 'n/a'} | "
                + r.ratio_cells("half", ("artifact", "torch", "ort", "ov_default"))
                + f" | {r.error:.1e} |"
            )
        lines.append("")
    else:
        lines += [
            "No 16-bit artifact: this CPU has neither AVX-512 FP16 nor BF16."
            if asked_half
            else "No 16-bit artifact: not asked for (`--no-half`).",
            "",
        ]
    from builder import flops
    from builder.assemble import export

    for b in breakdowns:
        name, model, kernels, around = b.name, b.preset.model, b.kernels, b.around
        total = sum(t for _, _, t in kernels)
        layers = model.num_layers_computed
        gemm = gemm_seconds(kernels)
        linear = flops.work(export(model, b.preset.blocks)[0])["matmul"]
        lines += [
            f"## Per-kernel time, {name}, batch 1 (one forward; per layer = total / {layers})",
            "",
            f"GEMMs (linear layers, epilogues fused): {linear / gemm:.1f} GFLOP/s, "
            f"{100 * linear / gemm / peak:.0f}% of the FMA peak, "
            f"{100 * linear / gemm / around:.0f}% of the faster of the FMA samples taken just "
            f"before and after these forwards ({around:.1f} GFLOP/s).",
            "",
            "| kernel | calls | ms per layer | share |",
            "|---|---|---|---|",
        ]
        for kernel, calls, seconds in kernels[:12]:
            lines.append(
                f"| {kernel} | {calls} | {1e3 * seconds / layers:.2f} | "
                f"{100 * seconds / total:.1f}% |"
            )
        if b.sixteen_bit_kernels:
            sixteen_bit_kernels = b.sixteen_bit_kernels
            sixteen_bit_total = sum(t for _, _, t in sixteen_bit_kernels)
            shares = ""
            if bf16_peak:
                gemm_rate = linear / gemm_seconds(sixteen_bit_kernels)
                whole_rate = b.gflop / sixteen_bit_total
                shares = (
                    f" GEMMs: {gemm_rate:.1f} GFLOP/s, {100 * gemm_rate / bf16_peak:.0f}% of the "
                    f"vdpbf16ps peak, {100 * gemm_rate / max(b.bf16_around):.0f}% of the faster "
                    f"of the vdpbf16ps samples just around these forwards "
                    f"({max(b.bf16_around):.1f} GFLOP/s); the whole forward "
                    f"{whole_rate:.1f} GFLOP/s, {100 * whole_rate / bf16_peak:.0f}% of the peak."
                )
            lines += [
                "",
                f"The {args.half} artifact, {name}, batch 1: "
                f"{1e3 * sixteen_bit_total / layers:.2f} ms per layer, against "
                f"{1e3 * total / layers:.2f}." + shares,
                "",
                "| kernel | calls | ms per layer | share |",
                "|---|---|---|---|",
            ]
            for kernel, calls, seconds in sixteen_bit_kernels[:12]:
                lines.append(
                    f"| {kernel} | {calls} | {1e3 * seconds / layers:.2f} | "
                    f"{100 * seconds / sixteen_bit_total:.1f}% |"
                )
        lines += [
            "",
            f"## GEMM kernels alone, {name}, batch 1",
            "",
            "Each GEMM kernel called alone on the arguments of its first call in a forward, in "
            f"rounds of {ALONE_WINDOW_S} s of calls between two short FMA samples. The FMA rate "
            "alongside is "
            "each round's median GFLOP/s over the faster of its two FMA samples, median over "
            "the rounds; best is the fastest single call over the run's FMA peak.",
            "",
            "| kernel | M x K x N | GFLOP/s, median | % of the FMA rate alongside | "
            "best GFLOP/s | best, % of FMA peak |",
            "|---|---|---|---|---|---|",
        ]
        for kernel, m, k, n, median, best, ratio in b.alone:
            lines.append(
                f"| {kernel} | {m} x {k} x {n} | {median:.1f} | {100 * ratio:.0f}% | "
                f"{best:.1f} | {100 * best / peak:.0f}% |"
            )
        lines.append("")
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if rows:
        args.out.write_text("\n".join(lines))
        print(args.out)
    if crop_lines:
        args.multi_crop_out.write_text("\n".join(multi_crop_page(args, crop_lines)))
        print(args.multi_crop_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
