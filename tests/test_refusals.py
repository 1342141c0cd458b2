"""Every refusal of bad input: exit code 2, exactly one line on stderr, no traceback, no output folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_socc, tiny_mlp_model


def assert_refused(tmp_path: Path, model: Path, *extra: str, expect: str) -> str:
    out = tmp_path / "artifact"
    result = run_socc("compile", model, "-o", out, "--quiet", *extra)
    lines = result.stderr.strip().splitlines()
    assert result.code == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("socc: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact")], "staging folder left behind"
    return lines[0]


def test_missing_file(tmp_path: Path) -> None:
    assert_refused(tmp_path, tmp_path / "nope.onnx", expect="no such file")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.onnx").mkdir()
    assert_refused(tmp_path, tmp_path / "dir.onnx", expect="not a file")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_refused(tmp_path, tmp_path / "empty.onnx", expect="empty file")


def test_not_onnx(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(256))
    assert_refused(tmp_path, tmp_path / "model.onnx", expect="not an ONNX model")


def test_truncated_model(tmp_path: Path, mobilenet: Path) -> None:
    data = mobilenet.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, tmp_path / "cut.onnx", expect="not an ONNX model")


def test_empty_graph(tmp_path: Path) -> None:
    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    assert_refused(tmp_path, tmp_path / "g.onnx", expect="graph is empty")


def test_unsupported_ops_are_listed_with_node_and_opset(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Celu", ["x"], ["c"], name="celu_block3"),
            helper.make_node("Relu", ["c"], ["r"], name="relu_ok"),
            helper.make_node("Det", ["r"], ["y"], name="det_head"),
        ],
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "u.onnx")
    line = assert_refused(tmp_path, tmp_path / "u.onnx", expect="unsupported ONNX ops at opset 17")
    assert "Celu (node 'celu_block3')" in line and "Det (node 'det_head')" in line
    assert "Relu" not in line


def _model_with_external_weight(folder: Path, location: str) -> Path:
    model = tiny_mlp_model()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(16 * 8 * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_external_data_leaving_the_folder(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 512)
    assert_refused(folder, _model_with_external_weight(folder, location), expect="external data")


def test_external_data_symlink_out_of_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 512)
    (folder / "weights.bin").symlink_to(tmp_path / "outside.bin")
    assert_refused(folder, _model_with_external_weight(folder, "weights.bin"), expect="resolves outside")


def _model_with_weights_file(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with the MLP's first weight in weights.bin beside the model: (folder, model)."""
    folder = tmp_path / "m"
    folder.mkdir()
    weights = tiny_mlp_model().graph.initializer[0]
    (folder / "weights.bin").write_bytes(numpy_helper.to_array(weights).tobytes())
    return folder, _model_with_external_weight(folder, "weights.bin")


def test_external_data_inside_the_folder_is_accepted(tmp_path: Path) -> None:
    folder, model = _model_with_weights_file(tmp_path)
    result = run_socc("compile", model, "-o", folder / "art", "--quiet", "--verify")
    assert result.code == 0, result.stderr
    assert "PASS" in result.stdout


def test_initializer_with_absurd_shape(tmp_path: Path) -> None:
    model = tiny_mlp_model()
    model.graph.initializer[1].dims[:] = [1 << 40]
    (tmp_path / "big.onnx").write_bytes(model.SerializeToString())
    assert_refused(tmp_path, tmp_path / "big.onnx", expect="initializer 'B'")


def test_absurd_shape_option(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--shape", "x=100000000000,16", expect="--shape x=")


def test_shape_for_unknown_input(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--shape", "tokens=1,16", expect="unknown inputs tokens")


def test_unknown_target(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--target", "cortex-z9", expect="unknown target 'cortex-z9'")


def test_required_pass_cannot_be_skipped(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--skip-pass", "legalize", expect="required")


def test_unknown_pass(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--passes", "decompose,magic", expect="unknown pass 'magic'")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_socc("--debug", "compile", tmp_path / "nope.onnx", "-o", tmp_path / "o")
    assert result.code == 2
    assert "Traceback" in result.stderr


def test_json_error(tmp_path: Path) -> None:
    import json

    result = run_socc("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o", "--json")
    assert result.code == 2
    assert json.loads(result.stdout) == {"ok": False, "error": f"{tmp_path / 'nope.onnx'}: no such file", "exit_code": 2}


def test_random_bytes_never_crash(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = tiny_mlp_model().SerializeToString()
    for i in range(5):
        corrupt = bytearray(data)
        for pos in rng.integers(0, len(corrupt), 8):
            corrupt[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"c{i}.onnx"
        path.write_bytes(bytes(corrupt))
        result = run_socc("compile", path, "-o", tmp_path / f"o{i}", "--quiet")
        assert result.code in (0, 2), result.stderr
        assert "Traceback" not in result.stderr
        if result.code == 2:
            assert len(result.stderr.strip().splitlines()) == 1


def test_model_size_limit(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--max-model-size", "200B", expect="byte model size limit")


def test_external_data_counts_toward_the_size_limit(tmp_path: Path) -> None:
    folder, model = _model_with_weights_file(tmp_path)
    limit = model.stat().st_size + 100  # the file fits, its 512 bytes of external data do not
    assert_refused(folder, model, "--max-model-size", str(limit), expect="external data passes the")


def test_external_data_length_must_match_the_tensor(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 4096)
    path = _model_with_external_weight(folder, "weights.bin")
    m = onnx.load(path, load_external_data=False)
    for entry in m.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "100"
    path.write_bytes(m.SerializeToString())
    assert_refused(folder, path, expect="does not match its shape")


def test_tensor_element_limit(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--max-tensor-elements", "64", expect="initializer 'W'")


def test_no_pickle_eval_or_shell_strings_in_the_code() -> None:
    import re

    from conftest import REPO

    pattern = re.compile(r"\bpickle\b|(?<![.\w])eval\(|\bexec\(|shell\s*=\s*True|os\.system\(|os\.popen\(|allow_pickle\s*=\s*True")
    offenders = []
    for folder in ("toolchain", "passes", "targets"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("elem_type", [0, 99])
def test_undefined_input_element_type(tmp_path: Path, elem_type: int) -> None:
    # Found by the fuzzer: an input declared with element type 0 (UNDEFINED) or an unknown number.
    model = tiny_mlp_model()
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    assert_refused(tmp_path, tmp_path / "m.onnx", expect="element type")


@pytest.mark.parametrize(("attr", "values"), [("strides", [0, 1]), ("dilations", [1, -2]), ("pads", [0, -1, 0, 0])])
def test_windowed_op_attributes_that_would_divide_by_zero(tmp_path: Path, attr: str, values: list[int]) -> None:
    # Found by the fuzzer: a Conv with stride 0 killed onnxsim with SIGFPE before any check of ours ran.
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv_stem", **{attr: values})
    graph = helper.make_graph([conv], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])], [weight])
    (tmp_path / "c.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert_refused(tmp_path, tmp_path / "c.onnx", expect=f"Conv node 'conv_stem': invalid {attr} {values}")


def test_unknown_fusion_pattern(tmp_path: Path, tiny_mlp: Path) -> None:
    assert_refused(tmp_path, tiny_mlp, "--skip-fusion", "attention,warp-drive", expect="unknown fusion pattern 'warp-drive'")


def test_empty_required_input(tmp_path: Path, multi_io: Path) -> None:
    # Found by the fuzzer: Concat with an empty input name made TVM's importer segfault.
    model = onnx.load(multi_io)
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    concat.input[0] = ""
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    assert_refused(tmp_path, tmp_path / "m.onnx", expect=f"Concat node {concat.name!r}: input 0 is empty")


def test_empty_optional_input_is_fine(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Clip", ["x", "", "hi"], ["y"], name="clip_max_only")], "clip",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array(0.5, np.float32), "hi")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "clip.onnx")
    result = run_socc("compile", tmp_path / "clip.onnx", "-o", tmp_path / "art", "-q", "--verify")
    assert result.code == 0, result.stderr


def test_shape_output_is_refused_naming_it(tmp_path: Path) -> None:
    """A graph output made by Shape on a dynamic dim is a Relax shape, not a tensor."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"), helper.make_node("Shape", ["x"], ["dims"], name="shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
                               helper.make_tensor_value_info("dims", TensorProto.INT64, [2])])
    model = tmp_path / "shape_out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    assert_refused(tmp_path, model, expect="model output 'dims' is a shape")
