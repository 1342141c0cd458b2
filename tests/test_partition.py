"""SoC profiles with an accelerator: the partition map, CPU fallback per op, and the partitioned
program checked against the unpartitioned build (each APU subgraph compiled for the host CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import run_socc
from examples.models import CALIBRATION_SENTENCES, EVAL_SENTENCES, conv_gelu_conv, minilm_tokenize
from toolchain import api
from toolchain.targets import load_profile

DIMENSITY_ON_HOST = load_profile("dimensity-9300").with_host_cpu()


def _placement(art: api.Artifact) -> dict:
    return art.manifest["placement"]


def _check_map_complete(placement: dict) -> None:
    """Every op is on one unit; the map's subgraphs hold exactly the ops counted on the unit."""
    assert placement["ops_on_unit"] + placement["ops_on_cpu"] == placement["ops_total"]
    assert sum(g["op_count"] for g in placement["map"]) == placement["ops_on_unit"]
    assert sum(sum(g["ops"].values()) for g in placement["map"]) == placement["ops_on_unit"]
    assert sum(sum(r.values()) for r in placement["cpu_ops"].values()) == placement["ops_on_cpu"]
    for g in placement["map"]:
        assert g["unit"] == "apu" and g["inputs"] and g["outputs"]
        assert all(isinstance(d, int) for t in g["inputs"] + g["outputs"] for d in t["shape"])
        assert g["crossing_bytes"] == sum(int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
                                          for t in g["inputs"] + g["outputs"])


@pytest.fixture(scope="module")
def cnn_calibration(mobilenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "images.npz"
    np.savez(path, image=np.random.default_rng(0).standard_normal((4, 1, 3, 96, 96)).astype(np.float32))
    return path


def test_cnn_int8_for_dimensity_9300(mobilenet: Path, cnn_calibration: Path, tmp_path: Path) -> None:
    options = {"quantize": "int8", "calibration": cnn_calibration, "calibrate_method": "minmax", "progress": False}
    parted = api.compile(mobilenet, DIMENSITY_ON_HOST, tmp_path / "part", **options)
    # the same build unpartitioned: the host profile in the SoC's layout (the host's own is NHWC)
    whole = api.compile(mobilenet, "host", tmp_path / "whole", layout=parted.manifest["options"]["layout"], **options)
    placement = _placement(parted)
    _check_map_complete(placement)
    assert placement["mac_share"] >= 0.9
    assert placement["subgraphs_built_for"] == "cpu" and "relax.ext.nnapi" in placement["why"]
    assert placement["map"][0]["ops"]["nn.conv2d"] == 52  # every conv of MobileNetV2-0.5 on the APU
    assert "partition" not in [p["name"] for p in whole.manifest["passes"] if p["stats"].get("subgraphs")]
    quant = whole.manifest["quantization"]  # a real architecture's int8 weights, scales and biases included
    assert quant["weights_bytes"] <= 0.26 * quant["weights_bytes_float"], quant["weights_bytes"] / quant["weights_bytes_float"]
    rng = np.random.default_rng(1)
    for _ in range(3):
        feed = {"image": rng.standard_normal((1, 3, 96, 96)).astype(np.float32)}
        np.testing.assert_array_equal(parted.run(feed)["logits"], whole.run(feed)["logits"])


def test_an_op_the_apu_lacks_runs_on_the_cpu_alone(tmp_path: Path) -> None:
    model = conv_gelu_conv(tmp_path / "gelu.onnx")
    parted = api.compile(model, DIMENSITY_ON_HOST, tmp_path / "part", progress=False)
    whole = api.compile(model, "host", tmp_path / "whole", layout=parted.manifest["options"]["layout"], progress=False)
    placement = _placement(parted)
    _check_map_complete(placement)
    assert placement["cpu_ops"] == {"erf": {"op erf not on the unit": 1}}
    assert [g["ops"].get("nn.conv2d") for g in placement["map"]] == [1, 1]
    first, second = placement["map"]
    assert first["inputs"][0]["name"] == "image" and first["outputs"][0]["shape"] == [1, 32, 32, 32]
    assert len(second["inputs"]) == 2  # the erf's output and the conv output it multiplies
    feed = {"image": np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)}
    out = parted.run(feed)["y"]
    np.testing.assert_array_equal(out, whole.run(feed)["y"])
    reference = ort.InferenceSession(str(model)).run(None, feed)[0]
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)
    again = api.compile(model, DIMENSITY_ON_HOST, tmp_path / "again", progress=False)
    assert again.manifest["files"] == parted.manifest["files"]  # a partitioned build is deterministic too


def test_minilm_int8_for_dimensity_9300(minilm: Path, tmp_path: Path) -> None:
    """Placement of MiniLM int8, and its sentence embeddings against the float model (onnxruntime).
    (The partitioned build equals the unpartitioned one bit for bit, as the CNN test checks; for
    MiniLM that was measured once, see the README, to keep the suite short.)"""
    seq = 16
    options = {"quantize": "int8", "calibration": [minilm_tokenize([s], seq) for s in CALIBRATION_SENTENCES],
               "shape": [f"input_ids=1,{seq}", f"attention_mask=1,{seq}"], "progress": False}
    parted = api.compile(minilm, DIMENSITY_ON_HOST, tmp_path / "part", **options)
    placement = _placement(parted)
    _check_map_complete(placement)
    assert placement["mac_share"] == 1.0  # every matmul on the APU
    assert sum(g["ops"].get("matmul", 0) for g in placement["map"]) == 6 * 8  # per layer: q, k, v, QK, AV, out, 2 FFN
    cpu = placement["cpu_ops"]
    assert cpu["erf"] == {"op erf not on the unit": 6}  # GELU's erf, one per layer
    assert cpu["take"] == {"op take not on the unit": 2}  # the embedding gathers on int64 ids
    assert "matmul" not in cpu and "nn.conv2d" not in cpu
    session = ort.InferenceSession(str(minilm))
    for sentence in EVAL_SENTENCES[:4]:
        feed = minilm_tokenize([sentence], seq)
        got = parted.run(feed)["sentence_embedding"].ravel()
        want = session.run(["sentence_embedding"], feed)[0].ravel()
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.99




def test_dimensity_artifact_for_the_phone_runs_under_qemu(tmp_path: Path) -> None:
    """The real dimensity-9300 build (aarch64, APU subgraphs compiled for its Cortex-A cores here)."""
    model = conv_gelu_conv(tmp_path / "gelu.onnx", channels=16, size=16)
    profile = tmp_path / "my-phone.toml"
    profile.write_text('extends = "dimensity-9300"\nname = "my-phone"\n[units.apu]\nmin_macs = 0\n')
    result = run_socc("compile", model, "--profile", profile, "-o", tmp_path / "phone", "--json", "--verify")
    assert result.code == 0, result.stderr
    art = api.load(tmp_path / "phone")
    assert art.target["triple"] == "aarch64-linux-gnu" and art.target["cpu"] == "cortex-x4"
    placement = _placement(art)
    assert placement["subgraphs"] == 2 and placement["cpu_ops"] == {"erf": {"op erf not on the unit": 1}}
    inspect = run_socc("inspect", tmp_path / "phone")
    assert "place    apu: 2 subgraphs" in inspect.stdout and "cpu      erf" in inspect.stdout
    feed = {"image": np.random.default_rng(0).standard_normal((1, 16, 16, 16)).astype(np.float32)}
    reference = ort.InferenceSession(str(model)).run(None, feed)[0]
    np.testing.assert_allclose(art.run(feed)["y"], reference, rtol=1e-4, atol=1e-5)


def test_snapdragon_builds_the_cpu_part_and_says_so(tiny_mlp: Path, tmp_path: Path) -> None:
    art = api.compile(tiny_mlp, "snapdragon-8-gen-3", tmp_path / "sd", progress=False)
    placement = _placement(art)
    assert placement["accelerator"] is None
    assert "whole model runs on the CPU" in placement["units_not_used"]["dsp"]
    assert art.target["units"]["dsp"]["profile"] == "hexagon-v75"
    assert art.target["cpu"] == "cortex-x4"


def test_targets_table_lists_socs_and_user_profiles(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "dimensity-9200"\nname = "mine"\n[units.apu]\nmin_macs = 5\n')
    result = run_socc("targets", "--profile", mine)
    assert result.code == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    for name in ("snapdragon-8-gen-3", "snapdragon-8-gen-2", "snapdragon-888", "dimensity-9300", "dimensity-9200",
                 "dimensity-8300", "mediatek-apu", "arm-cpu", "hexagon-v75", "mine"):
        assert name in rows
    assert "cpu+apu" in rows["dimensity-9300"] and "cpu+dsp" in rows["snapdragon-8-gen-3"]
    listed = json.loads(run_socc("targets", "--json", "--profile", mine).stdout)["targets"]
    facts = {t["name"]: t for t in listed}
    assert facts["mine"]["units"]["apu"]["min_macs"] == 5 and facts["mine"]["units"]["apu"]["unit"] == "MediaTek APU 690"
    assert facts["snapdragon-8-gen-3"]["units"]["dsp"]["vtcm_bytes"] == 8 << 20
