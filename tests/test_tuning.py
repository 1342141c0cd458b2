"""`socc tune`: MetaSchedule records kept in a database and applied by later compiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_socc
from toolchain import api
from toolchain.errors import UserError

SHAPE = ["x=32,16"]
WIDE_SHAPE = ["x=64,256"]


@pytest.fixture(scope="module")
def wide_mlp(models_dir: Path) -> Path:
    """x[64,256] -> MatMul 256x256 -> Add -> Relu: small enough to build fast."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["mm", "B"], ["biased"]),
         helper.make_node("Relu", ["biased"], ["y"])],
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        [numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "B")],
    )
    path = models_dir / "wide_mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _apply_stats(art: api.Artifact) -> dict:
    return next(p["stats"] for p in art.manifest["passes"] if p["name"] == "apply-tuning")


def test_tuned_records_are_applied_by_later_compiles(wide_mlp: Path, tmp_path: Path) -> None:
    # A host profile of the user's without vector schedules (`vector_bits = -1`: kernels are TVM's
    # loop nests), so that 4 MetaSchedule trials surely beat its default: on the host profile the
    # register-tiled default (~0.03 ms) is not beaten by so few trials, and a margin of a few
    # percent is noise on this machine (a record timed 0.55 ms in the search and 1.06 ms again).
    profile = tmp_path / "host-loops.toml"
    profile.write_text('extends = "host"\nname = "host-loops"\nvector_bits = -1\n')
    db = tmp_path / "db"
    result = run_socc("tune", wide_mlp, "--target", profile, "--tuning-db", db, "--shape", WIDE_SHAPE[0], "--trials", "4", "--json", "--quiet")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tuned"] >= 1 and report["tuned"] == sum(k["kept"] for k in report["kernels"]), report["kernels"]
    # a record is kept only when its schedule, timed here as the default was, is faster
    assert all(0 < k["tuned_ms"] < k["default_ms"] for k in report["kernels"] if k["kept"])
    # tuned slowest first: each kernel's default schedule timed once here, ordered by time x calls
    default = [k["default_ms"] * k["weight"] for k in report["kernels"]]
    assert all(d > 0 for d in default) and default == sorted(default, reverse=True)
    assert Path(report["database"]) == db / "host-loops"
    assert (db / "host-loops" / "database_tuning_record.json").read_text().strip()

    tuned = api.compile(wide_mlp, str(profile), tmp_path / "tuned", shape=WIDE_SHAPE, tuning_db=db, progress=False)
    plain = api.compile(wide_mlp, str(profile), tmp_path / "plain", shape=WIDE_SHAPE, tuning_db=tmp_path / "empty", progress=False)
    assert _apply_stats(tuned)["kernels_tuned"] == report["tuned"]
    assert _apply_stats(plain)["kernels_tuned"] == 0
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    reference = ort.InferenceSession(str(wide_mlp)).run(None, {"x": x})[0]
    np.testing.assert_allclose(tuned.run({"x": x})["y"], reference, rtol=1e-4, atol=1e-4)
    again = api.compile(wide_mlp, str(profile), tmp_path / "again", shape=WIDE_SHAPE, tuning_db=db, progress=False)
    assert again.manifest["files"] == tuned.manifest["files"]  # the same records give the same bytes

    records = (db / "host-loops" / "database_tuning_record.json").read_text()
    repeat = api.tune(wide_mlp, str(profile), db, shape=WIDE_SHAPE, trials=2, progress=False)  # kernels with records are kept
    tuned_names = {k["name"] for k in report["kernels"] if k["kept"]}
    kept = {k["name"] for k in repeat["kernels"] if k["error"] == "already tuned (record kept)"}
    assert tuned_names <= kept and repeat["tuned"] == 0
    assert (db / "host-loops" / "database_tuning_record.json").read_text() == records


def test_a_record_slower_than_the_default_is_not_kept(tmp_path: Path) -> None:
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from toolchain.tuning import _tune_one, quick_frame_modules, tuning_target

    a, b = te.placeholder((32, 16), name="a"), te.placeholder((16, 8), name="b")
    k = te.reduce_axis((0, 16), name="k")
    product = te.compute((32, 8), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="product")
    kernel = tvm.IRModule({"main": te.create_prim_func([a, b, product])})
    target = tuning_target(tvm.target.Target({"kind": "llvm"}))
    task = ms.ExtractedTask("product", kernel, target, [kernel], 1)
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    builder, runner = ms.builder.LocalBuilder(max_workers=1, initializer=quick_frame_modules), ms.runner.LocalRunner()
    # a default that takes no time at all: no tuned schedule beats it
    outcome = _tune_one(task, target, tmp_path, database, 1, builder, runner, default_ms=0.0)
    assert not outcome.kept and "record not kept" in outcome.error, outcome
    assert outcome.best_ms > 0, outcome
    assert not database.get_all_tuning_records()  # nothing went into the database


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
