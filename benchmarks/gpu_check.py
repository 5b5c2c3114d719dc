"""The cuda artifacts on a real GPU: parity against HF CLIPVisionModel, and speed against
PyTorch eager.

    python benchmarks/gpu_check.py [--out DIR] [--report docs/gpu-check.md] [--tiny-only]

For a tiny tower and for llava-clip (ViT-L/14-336, random weights: the numbers do not
depend on trained values), it makes an HF checkpoint with save_pretrained, builds two cuda
artifacts from it (precision float32 and float16; arch sm_80, sm_90 and this GPU's), loads
each with `builder.load`, and compares with HF `CLIPVisionModel` run on the same GPU in
float32 (TF32 off). Tolerances, max abs error over max |reference|: 1e-4 for float32, 2e-2
for float16. It then times each artifact and PyTorch CUDA eager float16 at batch 1 and 8
(median of 20 runs after 3 warm-ups, inputs already on the GPU, synchronized) and writes a
Markdown table.

Needs a CUDA GPU, nvcc, the test extras with a CUDA build of torch. Exits 2 with a message
when there is no GPU, 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
BATCHES = (1, 8)
WARMUP, RUNS = 3, 20


def fail(code: int, message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(code)


def cuda_or_exit() -> tuple[object, str]:
    try:
        import torch
    except ImportError:
        fail(2, "needs torch (pip install '.[test]' with a CUDA build of torch)")
    import tvm

    if not torch.cuda.is_available():
        fail(2, "no CUDA device for torch (torch.cuda.is_available() is False); run on a GPU")
    if not tvm.cuda(0).exist:
        fail(2, "no CUDA device for TVM (tvm.cuda(0) does not exist); run on a GPU")
    major, minor = torch.cuda.get_device_capability(0)
    return torch, f"sm_{major}{minor}"


def median_ms(fn, sync) -> float:
    for _ in range(WARMUP):
        fn()
    sync()
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def reference(hf, m, x):
    """The features the preset selects, from HF's hidden states (as tests/conftest.py's
    expected_features, on the GPU)."""
    import torch

    states = hf(x, output_hidden_states=True).hidden_states
    picked = []
    for i in m.feature_layers:
        state = states[i]
        if m.final_norm and i == m.num_hidden_layers:
            state = hf.vision_model.post_layernorm(state)  # the CLIP and SigLIP families
        picked.append(state)
    out = torch.cat(picked, dim=-1)
    return (out[:, 1:] if m.feature_select_strategy == "default" else out).cpu().numpy()


def check(torch, name: str, overrides: list[str], arch: list[str], work: Path) -> list[dict]:
    import numpy as np

    import builder
    from builder import families
    from builder.build import build
    from builder.preset import load_preset
    from tests.conftest import randomize

    base = load_preset(name, overrides)
    m = base.model
    checkpoint = work / f"{name}-hf"
    hf = randomize(families.get(base.family).reference_model(m))
    hf.save_pretrained(checkpoint)
    arch_list = "[" + ", ".join(arch) + "]"
    targets = (
        f"targets=[{{name: cuda, kind: cuda, arch: {arch_list}}}, "
        f"{{name: cuda-fp16, kind: cuda, arch: {arch_list}, precision: float16}}]"
    )
    preset = load_preset(name, [*overrides, f"weights.path={checkpoint}", targets])
    t0 = time.perf_counter()
    built = build(preset, work / "out", progress=lambda line: print(line, file=sys.stderr))
    print(f"{name}: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = hf.cuda().eval()
    hf16 = copy.deepcopy(hf).half()
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).standard_normal(
            (batch, 3, m.image_size, m.image_size), dtype=np.float32
        )
        with torch.inference_mode():
            xt = torch.from_numpy(x).cuda()
            ref = reference(hf, m, xt)
            x16 = xt.half()
            torch_ms = median_ms(
                lambda x16=x16: hf16(x16, output_hidden_states=True), torch.cuda.synchronize
            )
        row = {"preset": name, "batch": batch, "torch fp16 eager": torch_ms}
        for b in built:
            enc = builder.load(b.path)
            precision = "float16" if b.target.endswith("fp16") else "float32"
            ours = enc(x)
            err = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
            row[f"{precision} rel err"] = err
            if err > TOLERANCE[precision]:
                row["FAIL"] = f"{b.target}: {err:.2e} > {TOLERANCE[precision]}"
            import tvm

            xd = tvm.runtime.tensor(x, enc.device)
            row[f"artifact {precision}"] = median_ms(
                lambda enc=enc, xd=xd: enc._fn(xd, *enc._params), enc.device.sync
            )
        rows.append(row)
    return rows


def table(rows: list[dict], device: str) -> str:
    cols = [
        ("preset", "{}"),
        ("batch", "{}"),
        ("torch fp16 eager", "{:.2f} ms"),
        ("artifact float32", "{:.2f} ms"),
        ("artifact float16", "{:.2f} ms"),
        ("float32 rel err", "{:.1e}"),
        ("float16 rel err", "{:.1e}"),
    ]
    out = [f"Device: {device}.", "", "| " + " | ".join(c for c, _ in cols) + " |"]
    out.append("|" + "---|" * len(cols))
    for r in rows:
        out.append("| " + " | ".join(f.format(r[c]) for c, f in cols) + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--report", type=Path, help="write the Markdown table here too")
    parser.add_argument("--tiny-only", action="store_true", help="skip llava-clip")
    args = parser.parse_args()
    torch, sm = cuda_or_exit()
    from builder.targets import device_code

    arch = sorted({"sm_80", "sm_90", sm}, key=device_code.arch_number)
    tiny = [
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "model.num_attention_heads=4",
        "model.num_hidden_layers=3",
        "model.image_size=64",
        "model.patch_size=16",
    ]
    cases = [("clip-vit-b-32", tiny)] + ([] if args.tiny_only else [("llava-clip", [])])
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        rows = [r for name, ov in cases for r in check(torch, name, ov, arch, work)]
    device = f"{torch.cuda.get_device_name(0)} ({sm}), torch {torch.__version__}"
    text = table(rows, device)
    print(text)
    if args.report:
        args.report.write_text(text)
    failed = [r["FAIL"] for r in rows if "FAIL" in r]
    if failed:
        fail(1, "parity failed: " + "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
