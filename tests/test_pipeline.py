"""Pass selection rules, and that each pass reports stats that describe a real rewrite."""

from __future__ import annotations

from pathlib import Path

import pytest

import toolchain
from toolchain.errors import UserError
from toolchain.pipeline import select_passes


def names(passes: list) -> list[str]:
    return [p.name for p in passes]


def test_standard_order() -> None:
    assert names(select_passes()) == ["fold-batchnorm", "decompose", "convert-layout", "fold-constants", "quantize", "partition", "winograd", "fusion", "legalize",
                                     "fuse-kernels", "apply-tuning", "vectorize",
                                     "lower-calls", "static-plan", "memory-plan", "lower-vm"]


def test_passes_keeps_required_ones_in_place() -> None:
    assert names(select_passes(passes=["fuse-kernels"])) == ["legalize", "fuse-kernels", "lower-calls", "lower-vm"]


def test_skip_and_profile_default() -> None:
    assert "fuse-kernels" not in names(select_passes(skip_pass=["fuse-kernels"]))
    assert names(select_passes(default=("decompose",))) == ["decompose", "legalize", "lower-calls", "lower-vm"]
    with pytest.raises(UserError, match="required"):
        select_passes(skip_pass=["lower-vm"])


def test_stats_describe_the_rewrite(tmp_path: Path, tiny_mlp: Path) -> None:
    artifact = toolchain.compile(tiny_mlp, "host", tmp_path / "a", progress=False)
    stats = {p["name"]: p["stats"] for p in artifact.manifest["passes"]}
    assert stats["legalize"]["kernels_before"] == 0 and stats["legalize"]["kernels_after"] == 3
    assert stats["fuse-kernels"]["kernels_after"] < stats["fuse-kernels"]["kernels_before"]
    unfused = toolchain.compile(tiny_mlp, "host", tmp_path / "b", skip_pass=["fuse-kernels"], progress=False)
    assert "fuse-kernels" not in [p["name"] for p in unfused.manifest["passes"]]
    assert unfused.manifest["options"]["skip_pass"] == ["fuse-kernels"]
    assert toolchain.verify(unfused, model=tiny_mlp).ok and toolchain.verify(artifact, model=tiny_mlp).ok


def test_fold_constants_in_numpy_gives_tvms_module() -> None:
    """The importer's Clip bound checks (isnan -> where on constants), a bias reshape and a weight
    cast: folded in numpy (TVM would compile a kernel for each) to the module TVM's FoldConstant makes."""
    import numpy as np
    import tvm
    from tvm import relax

    from toolchain.passes.fold_constants import fold_in_numpy

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            low = bb.emit(relax.op.where(bb.emit(relax.op.isnan(relax.const(np.float32(0)))), relax.const(np.float32(-np.inf)),
                                         relax.const(np.float32(0))))
            bias = bb.emit(relax.op.reshape(relax.const(np.arange(4, dtype=np.float32)), (1, 4, 1, 1)))
            scale = bb.emit(relax.op.astype(relax.const(np.array([3], np.int8)), "float32"))
            y = bb.emit(relax.op.multiply(relax.op.add(x, bias), scale))
            out = bb.emit_output(relax.op.maximum(y, low))
        bb.emit_func_output(out)
    mod = bb.get()
    folded, count = fold_in_numpy(mod)
    assert count == 4  # isnan, where, reshape, astype
    assert "isnan" not in folded.script() and "reshape" not in folded.script()
    fold = relax.transform.FoldConstant()  # what the pass runs after: it inlines the constant bindings
    tvm.ir.assert_structural_equal(fold(folded), fold(mod))
