"""`build encode --engine ray` on a real local Ray cluster (started here, 2 CPUs), against
the local engine: the same shards byte for byte, the same index."""

from __future__ import annotations

import json

import pytest

import builder
from builder.cli import main

from .conftest import REPO
from .test_encode import corrupt_inputs, encode_artifact, read_index  # noqa: F401

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # The workers import this checkout's builder, as the driver does.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 << 20,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield ray
    ray.shutdown()


def same_output(a, b) -> None:
    assert read_index(a) == read_index(b)
    names = sorted(p.name for p in a.glob("shard-*.npy"))
    assert names and names == sorted(p.name for p in b.glob("shard-*.npy"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ray_engine_equals_the_local_engine(ray_cluster, encode_artifact, tmp_path, capsys):  # noqa: F811
    inputs, bad = corrupt_inputs(tmp_path / "imgs")
    local = tmp_path / "local"
    builder.encode_dataset(encode_artifact, inputs, local, shard_size=3, batch=2, workers=1)
    out = tmp_path / "ray"
    args = ["encode", str(encode_artifact), *inputs, "--out", str(out), "--shard-size", "3"]
    assert main([*args, "--batch", "2", "--engine", "ray", "--quiet"]) == 0
    assert "8 images: 4 encoded, 4 failed" in capsys.readouterr().err
    same_output(out, local)
    assert {r["key"] for r in read_index(out) if r["error"]} == bad
    record = json.loads((out / "encode.json").read_text())
    assert record["engine"] == "ray" and record["failed"] == 4
    # Resume with Ray what the local engine left: the last shard removed, as if killed.
    (local / "shard-00002.npy").unlink()
    (local / "parts" / "shard-00002.parquet").unlink()
    (local / "index.parquet").unlink()
    again = builder.encode_dataset(
        encode_artifact, inputs, local, shard_size=3, batch=3, engine="ray"
    )
    assert again["resumed_shards"] == 2
    same_output(out, local)
    # Actors that would take every CPU of the cluster: refused, not a pipeline that waits.
    args[args.index(str(out))] = str(tmp_path / "ray-2")
    assert main([*args, "--engine", "ray", "--workers", "2", "--quiet"]) == 2
    assert (
        "--workers 2 x --threads 1: the encoder actors would take 2 of the cluster's 2 CPUs, "
        "leaving none for decoding"
    ) in capsys.readouterr().err.splitlines()
