"""memory-plan: one arena for every intermediate tensor, on real TVM builds.

The plan is checked by a checker written apart from the planner: it reads only the rewritten
module (each `alloc_tensor` on a storage, its offset and shape, and where the tensor or anything
made from it is used) and looks for two tensors that are alive together and share bytes. Outputs
are compared with onnxruntime.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import toolchain
from toolchain.api import _import_with_context, resolve_target
from toolchain.importer import Limits
from toolchain.passes import REGISTRY
from toolchain.passes.memory_plan import (
    ARENA_NAME,
    CHECK_FUNC,
    MemoryBudgetExceeded,
    Problem,
    check_budget,
    largest_tensors,
    memory_timeline,
    plot_memory,
    report_markdown,
    solve,
)
from toolchain.pipeline import run_passes, select_passes
from toolchain.progress import SILENT

# ------------------------------------------------------------------------------------ models


def mlp_residual_model(batch: int | str = 4) -> onnx.ModelProto:
    """x[batch,16] -> MatMul 64 -> Relu -> MatMul 16 -> + x -> Reshape [-1, 8] -> Sigmoid -> MatMul 8 -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32) * 0.3, "W1"),
        numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32) * 0.3, "W2"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W3"),
        numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "shape8"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["h2"]),
        helper.make_node("Add", ["h2", "x"], ["res"]),
        helper.make_node("Reshape", ["res", "shape8"], ["flat"]),
        helper.make_node("Sigmoid", ["flat"], ["s"]),
        helper.make_node("MatMul", ["s", "W3"], ["y"]),
    ]
    out_rows: int | str = batch * 2 if isinstance(batch, int) else "rows"
    graph = helper.make_graph(nodes, "mlp_residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [out_rows, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="socc-tests")


def branchy_cnn_model(size: int = 32) -> onnx.ModelProto:
    """A small CNN with two inception blocks (1x1 / 1x1->3x3 / maxpool->1x1 branches, concat),
    a residual over two convs, global average pool and a classifier."""
    rng = np.random.default_rng(1)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        name = f"conv{len(nodes)}"
        w = rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)
        inits.append(numpy_helper.from_array(w.astype(np.float32), name + "_w"))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), name + "_b"))
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [name + "_relu"]))
        return name + "_relu"

    def inception(x: str, cin: int, c1: int, c3r: int, c3: int, cp: int, tag: str) -> tuple[str, int]:
        b1 = conv(x, cin, c1, 1)
        b2 = conv(conv(x, cin, c3r, 1), c3r, c3, 3)
        nodes.append(helper.make_node("MaxPool", [x], [tag + "_pool"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]))
        b3 = conv(tag + "_pool", cin, cp, 1)
        nodes.append(helper.make_node("Concat", [b1, b2, b3], [tag + "_cat"], axis=1))
        return tag + "_cat", c1 + c3 + cp

    h = conv("image", 3, 16, 3, stride=2)
    h, c = inception(h, 16, 16, 8, 24, 8, "inc1")
    skip = h
    h = conv(conv(h, c, 32, 3), 32, c, 1, relu=False)
    nodes.append(helper.make_node("Add", [h, skip], ["res1"]))
    h = conv("res1", c, 64, 3, stride=2)
    h, c = inception(h, 64, 32, 16, 48, 16, "inc2")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.append(numpy_helper.from_array((rng.standard_normal((c, 10)) * 0.1).astype(np.float32), "fc_w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc_w"], ["logits"]))
    graph = helper.make_graph(nodes, "branchy_cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="socc-tests")


@pytest.fixture(scope="module")
def branchy_cnn(models_dir: Path) -> Path:
    path = models_dir / "branchy_cnn.onnx"
    onnx.save(branchy_cnn_model(), path)
    return path


@pytest.fixture(scope="module")
def mlp_residual(models_dir: Path) -> Path:
    path = models_dir / "mlp_residual.onnx"
    onnx.save(mlp_residual_model(4), path)
    return path


@pytest.fixture(scope="module")
def mlp_dynamic(models_dir: Path) -> Path:
    path = models_dir / "mlp_dynamic.onnx"
    onnx.save(mlp_residual_model("batch"), path)
    return path


# ------------------------------------------------------------------------------------ helpers


def plan(model: Path, options: dict[str, Any] | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Runs the standard passes as `toolchain.compile` does; returns the module right after
    memory-plan, the fully lowered one, and every pass's stats."""
    profile = resolve_target("host")
    # the importer and pass context compile builds (layout, vector width, thread pool from the profile)
    imported, ctx = _import_with_context(Path(model), profile, {}, Limits(), False, None, {"layout": profile.layout, **(options or {})},
                                         SILENT, None)
    passes = select_passes(skip_pass=skip)
    cut = [p.name for p in passes].index("memory-plan") + 1
    planned, records = run_passes(imported.mod, passes[:cut], ctx)
    lowered, more = run_passes(planned, passes[cut:], ctx)
    stats = {r.name: r.stats for r in records + more}
    return {"planned": planned, "lowered": lowered, "stats": stats, "mem": stats["memory-plan"], "ctx": ctx}


def independent_arena_check(mod: Any, bounds: dict[str, int] | None = None, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Recomputes from the module alone which bytes of which storage each tensor occupies and
    when it (or anything derived from it) is in use, and lists the overlapping pairs.

    Written apart from the planner on purpose: every binding that mentions a tracked tensor keeps
    it alive and may point into it; kill ops are not uses. Symbolic dims count at `bounds`; where
    lowering moved a symbolic shape into a variable, `sizes` (by tensor name, from an earlier check
    of the same plan) gives the bytes.
    """
    import tvm
    from tvm import relax
    from tvm.sym import Analyzer

    analyzer = Analyzer()
    func = mod["main"]
    for param in func.params:
        for var in relax.analysis.definable_tir_vars_in_type(param.ty):
            if bounds and str(var.name) in bounds:
                analyzer.bind(var, tvm.tirx.IntImm(var.ty.dtype, bounds[str(var.name)]))

    def mentioned(expr: Any) -> set[Any]:
        found: set[Any] = set()
        relax.analysis.post_order_visit(expr, lambda e: found.add(e) if isinstance(e, relax.Var) else None)
        return found

    bindings = [b for block in func.body.blocks for b in block.bindings]
    storage_bytes: dict[Any, int] = {}
    tensors: list[dict[str, Any]] = []
    refers_to: dict[Any, set[int]] = {}
    for point, binding in enumerate(bindings):
        value = binding.value
        op = value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else ""
        if op in ("relax.memory.alloc_storage", "relax.vm.alloc_storage") and isinstance(value.args[0], relax.ShapeExpr):
            storage_bytes[binding.var] = int(value.args[0].values[0])  # (a storage of symbolic size is TVM's, not checked)
            continue
        if op in ("relax.memory.alloc_tensor", "relax.vm.alloc_tensor") and value.args[0] in storage_bytes:
            if isinstance(value.args[2], relax.ShapeExpr):
                dims = [int(analyzer.simplify(d).value) for d in value.args[2].values]
                nbytes = int(np.prod(dims, dtype=np.int64)) * np.dtype(str(value.args[3].value)).itemsize
            else:  # lowered symbolic shape
                nbytes = sizes[str(binding.var.name)]  # type: ignore[index]
            offset = int(value.args[1].value)
            tensors.append({"name": str(binding.var.name), "storage": value.args[0], "lo": offset, "hi": offset + nbytes,
                            "first": point, "last": point, "storage_bytes": storage_bytes[value.args[0]]})
            refers_to[binding.var] = {len(tensors) - 1}
            continue
        if "kill" in op:
            continue
        used = mentioned(value)
        derived: set[int] = set()
        for var in used:
            for t in refers_to.get(var, ()):
                tensors[t]["last"] = max(tensors[t]["last"], point)
                derived.add(t)
        if derived:
            refers_to[binding.var] = derived
    for var in mentioned(func.body.body):
        for t in refers_to.get(var, ()):
            tensors[t]["last"] = len(bindings)
    overlaps = [
        (a["name"], b["name"])
        for a, b in itertools.combinations(tensors, 2)
        if a["storage"].same_as(b["storage"]) and a["first"] <= b["last"] and b["first"] <= a["last"]
        and a["lo"] < b["hi"] and b["lo"] < a["hi"]
    ]
    arena = [t for t in tensors if str(t["storage"].name) == ARENA_NAME]
    return {
        "sizes": {t["name"]: t["hi"] - t["lo"] for t in tensors},
        "overlaps": overlaps,
        "out_of_bounds": [t["name"] for t in tensors if t["hi"] > t["storage_bytes"]],
        "misaligned": [t["name"] for t in arena if t["lo"] % 64],
        "arena_tensors": len(arena),
        "storages": len(storage_bytes),
        "arena_storages": sum(1 for var in storage_bytes if str(var.name) == ARENA_NAME),
    }


def assert_sound(result: dict[str, Any], bounds: dict[str, int] | None = None) -> None:
    mem = result["mem"]
    sizes = None
    for stage in ("planned", "lowered"):
        check = independent_arena_check(result[stage], bounds, sizes)
        sizes = check["sizes"]
        assert check["overlaps"] == [], f"{stage}: tensors alive together share bytes: {check['overlaps']}"
        assert check["out_of_bounds"] == [] and check["misaligned"] == [], check
        assert check["arena_tensors"] == mem["tensors"]
        assert check["arena_storages"] == (1 if mem["tensors"] else 0)
    assert mem["arena_bytes"] >= mem["lower_bound_bytes"]


def arena_killed_after_last_carve(lowered: Any) -> bool:
    """After lower-vm: KillAfterLastUse drops the arena variable only after its last alloc_tensor
    (the tensors carved from it keep the storage alive after that)."""
    from tvm import relax

    carves, kills = [], []
    for point, b in enumerate(b for block in lowered["main"].body.blocks for b in block.bindings):
        value = b.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") in ("relax.vm.alloc_tensor", "relax.vm.kill_object"):
            if isinstance(value.args[0], relax.Var) and str(value.args[0].name) == ARENA_NAME:
                (carves if value.op.name == "relax.vm.alloc_tensor" else kills).append(point)
    return bool(carves) and all(kill > max(carves) for kill in kills)


def count_storages(mod: Any) -> int:
    from toolchain.passes.stats import count_ops

    counts = count_ops(mod)
    return counts.get("relax.memory.alloc_storage", 0) + counts.get("relax.vm.alloc_storage", 0)


# ------------------------------------------------------------------------------------ planner


def test_planner_never_overlaps_and_beats_plain_greedy() -> None:
    """Random lifetimes and sizes: every plan is valid (checked pairwise here), aligned, at or
    above the lower bound, never worse than greedy-by-size, and much closer to the bound in total."""
    greedy_total = final_total = bound_total = 0
    for seed in range(40):
        rng = random.Random(seed)
        n = rng.randrange(1, 60)
        first = [rng.randrange(100) for _ in range(n)]
        last = [f + rng.randrange(0, 25) for f in first]
        sizes = [rng.randrange(1, 20_000) for _ in range(n)]
        problem = Problem(sizes, first, last)
        offsets, arena, name, heuristics = solve(problem)
        assert (offsets, arena, name) == solve(problem)[:3]  # deterministic
        for i, j in itertools.combinations(range(n), 2):
            if first[i] <= last[j] and first[j] <= last[i]:
                assert offsets[i] + sizes[i] <= offsets[j] or offsets[j] + sizes[j] <= offsets[i], (seed, i, j)
        assert all(o % 64 == 0 for o in offsets)
        assert arena == max(o + s for o, s in zip(offsets, sizes))
        assert problem.lower_bound() <= arena <= heuristics["greedy-by-size/first-fit"]
        greedy_total += heuristics["greedy-by-size/first-fit"]
        final_total += arena
        bound_total += problem.lower_bound()
    # measured: greedy-by-size alone is 2.1% above the lower bound in total, the final plans 0.4%
    assert final_total - bound_total < 0.5 * (greedy_total - bound_total)


# ------------------------------------------------------------------------------------ models


def test_branchy_cnn_arena_near_lower_bound(tmp_path: Path, branchy_cnn: Path) -> None:
    result = plan(branchy_cnn)
    mem = result["mem"]
    assert_sound(result)
    assert mem["tensors"] >= 10 and mem["unplanned_dynamic"] == 0
    assert mem["arena_bytes"] <= 1.02 * mem["lower_bound_bytes"], mem
    assert mem["arena_bytes"] < mem["tvm_default_bytes"], mem
    assert count_storages(result["planned"]) == 1  # only the arena: the output stays a plain allocation
    assert arena_killed_after_last_carve(result["lowered"])
    # the same plan whether or not TVM's planner ran first (memory-plan undoes its storage tokens)
    alone = plan(branchy_cnn, skip=("static-plan",))["mem"]
    assert {k: alone[k] for k in ("arena_bytes", "lower_bound_bytes", "tvm_default_bytes", "tensors")} == \
        {k: mem[k] for k in ("arena_bytes", "lower_bound_bytes", "tvm_default_bytes", "tensors")}

    artifact = toolchain.compile(branchy_cnn, "host", tmp_path / "cnn", progress=False)
    manifest_stats = {p["name"]: p["stats"] for p in artifact.manifest["passes"]}["memory-plan"]
    assert manifest_stats["arena_bytes"] == mem["arena_bytes"]
    assert toolchain.verify(artifact, model=branchy_cnn).ok


def test_mobilenet_arena(tmp_path: Path, mobilenet: Path) -> None:
    result = plan(mobilenet)
    mem = result["mem"]
    assert_sound(result)
    assert mem["tensors"] >= 40
    assert mem["arena_bytes"] <= 1.02 * mem["lower_bound_bytes"], mem
    assert mem["arena_bytes"] < mem["tvm_default_bytes"], mem
    assert count_storages(result["planned"]) == 1
    artifact = toolchain.compile(mobilenet, "host", tmp_path / "mbv2", progress=False)
    assert toolchain.verify(artifact, model=mobilenet).ok


def test_mlp_residual_and_multi_output(tmp_path: Path, mlp_residual: Path, multi_io: Path) -> None:
    for model, planned_tensors, outputs in ((mlp_residual, 3, 1), (multi_io, None, 4)):
        result = plan(model)
        mem = result["mem"]
        assert_sound(result)
        assert mem["outputs_unplanned"] == outputs  # a tuple of outputs: every member stays out of the arena
        if planned_tensors is not None:
            assert mem["tensors"] == planned_tensors
        artifact = toolchain.compile(model, "host", tmp_path / model.stem, progress=False)
        assert toolchain.verify(artifact, model=model).ok


def test_symbolic_dims(tmp_path: Path, mlp_dynamic: Path) -> None:
    import onnxruntime as ort
    import tvm
    from tvm import relax

    # no bound: nothing symbolic is planned; TVM's planner keeps those tensors, and the build still runs
    unbounded = plan(mlp_dynamic)
    assert unbounded["mem"]["tensors"] == 0 and unbounded["mem"]["unplanned_dynamic"] == 3
    assert "bounded_dims" not in unbounded["mem"]
    artifact = toolchain.compile(mlp_dynamic, "host", tmp_path / "dyn", progress=False)
    assert toolchain.verify(artifact, model=mlp_dynamic).ok

    bounds = {"batch": 64}
    result = plan(mlp_dynamic, {"max_shape": {**bounds, "no_such_dim": 3}})
    mem = result["mem"]
    assert mem["tensors"] == 3 and mem["unplanned_dynamic"] == 0
    assert mem["bounded_dims"] == bounds and mem["max_shape_unknown_dims"] == ["no_such_dim"]
    assert mem["arena_bytes"] >= 64 * (64 + 16) * 4  # planned at the bound
    assert_sound(result, bounds)
    assert result["planned"]["main"].attrs["tir_var_upper_bound"]["batch"] == 64

    executable = tvm.compile(result["lowered"], target=result["ctx"].target, relax_pipeline=None)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    session = ort.InferenceSession(str(mlp_dynamic), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 3, 64):
        x = rng.standard_normal((batch, 16)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="exceeds 64"):  # past the bound the arena would overflow: refused at run time
        vm["main"](tvm.runtime.tensor(np.zeros((65, 16), np.float32)))
    assert any(gv.name_hint == CHECK_FUNC for gv in result["planned"].get_global_vars())
    # after lower-vm the symbolic shapes live in variables: the report still knows each slot's size
    timeline = memory_timeline(result["lowered"])
    assert len(timeline["tensors"]) == 3 and max(timeline["live_bytes"]) == mem["lower_bound_bytes"]


def test_arena_on_arm_cpu(tmp_path: Path, branchy_cnn: Path) -> None:
    """Arena offsets on the cross-built aarch64 runtime (ensure_zero_offset there), run under qemu."""
    artifact = toolchain.compile(branchy_cnn, "arm-cpu", tmp_path / "arm", progress=False)
    mem = {p["name"]: p["stats"] for p in artifact.manifest["passes"]}["memory-plan"]
    assert 0 < mem["arena_bytes"] < mem["tvm_default_bytes"]
    assert toolchain.verify(artifact, model=branchy_cnn).ok


# ------------------------------------------------------------------------------------ reports


def test_timeline_report_plot(tmp_path: Path, branchy_cnn: Path) -> None:
    result = plan(branchy_cnn)
    mem = result["mem"]
    for stage in ("planned", "lowered"):
        timeline = memory_timeline(result[stage])
        assert timeline["arena_bytes"] == mem["arena_bytes"]
        assert len(timeline["tensors"]) == mem["tensors"]
        assert max(timeline["live_bytes"]) == mem["lower_bound_bytes"] == timeline["peak"]["bytes"]
        assert all(t["offset"] % 64 == 0 and t["first"] <= t["last"] for t in timeline["tensors"])
    text = report_markdown(mem, timeline)
    assert f"{mem['arena_bytes']:,}" in text and f"{mem['tvm_default_bytes']:,}" in text
    assert text.startswith("## Activation memory") and "largest tensors" in text
    plot_memory(timeline, mem, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    largest = largest_tensors(timeline)
    assert len(largest) == 3 and largest[0][1] == max(t["size"] for t in timeline["tensors"])
    check_budget(1000, mem["arena_bytes"], 1000 + mem["arena_bytes"], largest)  # fits exactly
    with pytest.raises(MemoryBudgetExceeded, match=largest[0][0]) as raised:
        check_budget(10 << 20, mem["arena_bytes"], 10 << 20, largest)
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value) and "budget" in str(raised.value)


def test_registered_after_static_plan() -> None:
    names = [p.name for p in select_passes()]
    assert names.index("lower-calls") < names.index("static-plan") < names.index("memory-plan") < names.index("lower-vm")
    assert "static-plan" in REGISTRY and "memory-plan" in REGISTRY
    assert "memory-plan" not in [p.name for p in select_passes(skip_pass=["memory-plan"])]
