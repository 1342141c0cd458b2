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
    assert names(select_passes()) == ["fold-batchnorm", "decompose", "convert-layout", "fold-constants", "quantize", "partition", "fusion", "legalize",
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
