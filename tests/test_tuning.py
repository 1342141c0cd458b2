"""`socc tune`: MetaSchedule records kept in a database and applied by later compiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import run_socc
from toolchain import api
from toolchain.errors import UserError

SHAPE = ["x=32,16"]


def _apply_stats(art: api.Artifact) -> dict:
    return next(p["stats"] for p in art.manifest["passes"] if p["name"] == "apply-tuning")


def test_tuned_records_are_applied_by_later_compiles(tiny_mlp: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    result = run_socc("tune", tiny_mlp, "--tuning-db", db, "--shape", SHAPE[0], "--trials", "2", "--json", "--quiet")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tuned"] >= 1 and report["tuned"] == sum(k["best_ms"] is not None for k in report["kernels"])
    assert all(k["best_ms"] > 0 for k in report["kernels"] if k["best_ms"] is not None)
    # tuned slowest first: each kernel's default schedule timed once here, ordered by time x calls
    default = [k["default_ms"] * k["weight"] for k in report["kernels"]]
    assert all(d > 0 for d in default) and default == sorted(default, reverse=True)
    assert Path(report["database"]) == db / "host"
    assert (db / "host" / "database_tuning_record.json").read_text().strip()

    tuned = api.compile(tiny_mlp, "host", tmp_path / "tuned", shape=SHAPE, tuning_db=db, progress=False)
    plain = api.compile(tiny_mlp, "host", tmp_path / "plain", shape=SHAPE, tuning_db=tmp_path / "empty", progress=False)
    assert _apply_stats(tuned)["kernels_tuned"] == report["tuned"]
    assert _apply_stats(plain)["kernels_tuned"] == 0
    x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    reference = ort.InferenceSession(str(tiny_mlp)).run(None, {"x": x})[0]
    np.testing.assert_allclose(tuned.run({"x": x})["y"], reference, rtol=1e-5, atol=1e-5)
    again = api.compile(tiny_mlp, "host", tmp_path / "again", shape=SHAPE, tuning_db=db, progress=False)
    assert again.manifest["files"] == tuned.manifest["files"]  # the same records give the same bytes

    records = (db / "host" / "database_tuning_record.json").read_text()
    repeat = api.tune(tiny_mlp, "host", db, shape=SHAPE, trials=2, progress=False)  # kernels with records are kept
    tuned_names = {k["name"] for k in report["kernels"] if k["best_ms"] is not None}
    kept = {k["name"] for k in repeat["kernels"] if k["error"] == "already tuned (record kept)"}
    assert tuned_names <= kept and repeat["tuned"] == 0
    assert (db / "host" / "database_tuning_record.json").read_text() == records


def test_tune_refuses_targets_it_cannot_measure(tiny_mlp: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot run here"):
        api.tune(tiny_mlp, "arm-cpu", tmp_path / "db", progress=False)
    with pytest.raises(UserError, match="--trials"):
        api.tune(tiny_mlp, "host", tmp_path / "db", trials=0, progress=False)


def test_bench_times_a_host_artifact(tiny_mlp: Path, tmp_path: Path) -> None:
    api.compile(tiny_mlp, "host", tmp_path / "mlp", shape=SHAPE, progress=False)
    result = run_socc("bench", tmp_path / "mlp", "--runs", "30", "--warmup", "2", "--threads", "1", "--json")
    assert result.code == 0, result.stderr
    timing = json.loads(result.stdout)
    assert timing["runs"] == 30 and timing["threads"] == 1
    assert 0 < timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"] < 1000
    refused = run_socc("bench", tmp_path / "mlp", "--runs", "0")
    assert refused.code != 0 and "--runs must be >= 1" in refused.stderr
