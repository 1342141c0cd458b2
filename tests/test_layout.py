"""convert-layout: convolutions in NHWC (`--layout NHWC`, the hexagon profiles' default), checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import toolchain
from examples import models
from toolchain.errors import UserError


def _pass_stats(art: toolchain.Artifact, name: str) -> dict:
    return next(p["stats"] for p in art.manifest["passes"] if p["name"] == name)


def test_nhwc_mobilenet_matches_onnxruntime_with_transposes_only_at_the_edges(tmp_path: Path) -> None:
    model = models.mobilenet_v2_like(tmp_path / "m.onnx", width=0.35, image_size=64, num_classes=10)
    art = toolchain.compile(model, "host", tmp_path / "m.nhwc", layout="NHWC", progress=False)
    stats = _pass_stats(art, "convert-layout")
    assert stats["layout"] == "NHWC" and art.manifest["options"]["layout"] == "NHWC"
    assert stats["convs_converted"] == 52  # every conv of MobileNetV2 (stem, 17 blocks, head)
    assert stats["clips_canonicalized"] == 70  # its 35 ReLU6 clamps (TE max/min kernels) became Relax ops
    # the layout flows from conv to conv through bias adds, ReLU6 and residual adds: one transpose
    # into NHWC after the image input, one back before the classifier's reshape
    assert stats["activation_transposes"] == 2
    image = np.random.default_rng(5).standard_normal((1, 3, 64, 64)).astype(np.float32)
    report = toolchain.verify(art, inputs={"image": image})
    assert report.ok and report.outputs[0].max_rel <= 1e-4 and report.outputs[0].cosine > 0.99999, report.table()


def test_nchw_is_left_alone_and_a_bad_layout_is_refused(tmp_path: Path, tiny_mlp: Path) -> None:
    with pytest.raises(UserError, match="layout must be one of NCHW, NHWC, not 'NWHC'"):
        toolchain.compile(tiny_mlp, "host", tmp_path / "bad", layout="NWHC", progress=False, isolate=False)
    profile = tmp_path / "p.toml"
    profile.write_text('extends = "host"\nname = "mine"\nlayout = "CHWN"\n')
    with pytest.raises(UserError, match="layout must be one of NCHW, NHWC, not 'CHWN'"):
        toolchain.compile(tiny_mlp, profile=profile, output=tmp_path / "bad2", progress=False, isolate=False)
    assert toolchain.targets.load_profile("hexagon-v73").layout == "NHWC"
    assert toolchain.targets.load_profile("host").layout == "NHWC"  # register-tiled convs (gemm.py)
    assert toolchain.targets.load_profile("arm-cpu").layout == "NHWC" and toolchain.targets.load_profile("dimensity-9300").layout == "NHWC"
