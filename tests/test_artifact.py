"""The artifact: manifest contents, byte-identical rebuilds, checksums on load, archives, CLI/API parity."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

import toolchain
from conftest import run_socc
from toolchain.errors import ArtifactError


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_mlp: Path) -> toolchain.Artifact:
    return toolchain.compile(tiny_mlp, "host", tmp_path_factory.mktemp("art") / "tiny.host", progress=False)


def test_manifest_records_what_a_user_needs(built: toolchain.Artifact, tiny_mlp: Path) -> None:
    m = built.manifest
    assert m["schema_version"] == 1
    assert m["source"]["sha256"] == hashlib.sha256(tiny_mlp.read_bytes()).hexdigest()
    assert m["source"]["opset"] == 17
    assert m["versions"]["apache-tvm"] == "0.27.0.post1"
    assert m["inputs"] == [{"name": "x", "shape": ["batch", 16], "dtype": "float32"}]  # symbolic batch stays symbolic
    assert m["outputs"] == [{"name": "y", "shape": ["batch", 8], "dtype": "float32"}]
    assert m["target"]["name"] == "host"
    assert set(m["files"]) == {"model.so", "report.md", "memory.png"}
    assert m["files"]["model.so"]["sha256"] == hashlib.sha256((built.path / "model.so").read_bytes()).hexdigest()


def test_symbolic_batch_runs_at_several_sizes(built: toolchain.Artifact) -> None:
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
        assert built.run({"x": x})["y"].shape == (batch, 8)


def test_rebuild_is_byte_identical(tmp_path: Path, tiny_mlp: Path, built: toolchain.Artifact) -> None:
    again = toolchain.compile(tiny_mlp, "host", tmp_path / "again", progress=False)
    assert tree_digest(again.path) == tree_digest(built.path)


def test_tampered_file_is_refused(tmp_path: Path, tiny_mlp: Path) -> None:
    art = toolchain.compile(tiny_mlp, "host", tmp_path / "a", progress=False)
    lib = art.path / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.so fails its SHA-256 check"):
        toolchain.load(art.path)
    lib.write_bytes(bytes(data[:100]))
    result = run_socc("verify", art.path, "--model", tiny_mlp)
    assert result.code == 2 and "model.so is 100 bytes" in result.stderr


def test_rebuild_over_an_existing_artifact_replaces_it_whole(tmp_path: Path, tiny_mlp: Path) -> None:
    out = tmp_path / "a"
    toolchain.compile(tiny_mlp, "host", out, progress=False)
    (out / "stale.txt").write_text("left from an old build")
    toolchain.compile(tiny_mlp, "host", out, progress=False)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging or old folders left


def test_archive_is_reproducible_and_loads(tmp_path: Path, tiny_mlp: Path) -> None:
    first = toolchain.compile(tiny_mlp, "host", tmp_path / "one" / "m", archive=True, progress=False)
    second = toolchain.compile(tiny_mlp, "host", tmp_path / "two" / "m", archive=True, progress=False)
    archive = first.path.with_name("m.tar.gz")
    assert archive.read_bytes() == second.path.with_name("m.tar.gz").read_bytes()
    with tarfile.open(archive) as tar:
        assert all(member.mtime == 0 and member.uid == 0 for member in tar.getmembers())
    loaded = toolchain.load(archive)
    assert loaded.manifest == first.manifest


def _evil_archive(path: Path, member: "tarfile.TarInfo", data: bytes = b"") -> Path:
    import io

    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("m")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


@pytest.mark.parametrize(("name", "kind", "expect"), [
    ("../../escape.txt", tarfile.REGTYPE, "leaves the folder"),
    ("/tmp/abs.txt", tarfile.REGTYPE, "leaves the folder"),
    ("m/link", tarfile.SYMTYPE, "a link"),
    ("m/hard", tarfile.LNKTYPE, "a link"),
    ("m/dev", tarfile.CHRTYPE, "device"),
    ("m/fifo", tarfile.FIFOTYPE, "device"),
])
def test_hostile_archive_members_are_refused(tmp_path: Path, name: str, kind: bytes, expect: str) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        member.linkname = "/etc/passwd"
    archive = _evil_archive(tmp_path / "evil.tar.gz", member, b"bad" if kind == tarfile.REGTYPE else b"")
    with pytest.raises(ArtifactError, match=expect):
        toolchain.load(archive)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]  # nothing extracted
    assert not Path("/tmp/abs.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_cli_and_api_agree(tmp_path: Path, tiny_mlp: Path, built: toolchain.Artifact) -> None:
    result = run_socc("compile", tiny_mlp, "-o", tmp_path / "cli", "--json", "--quiet")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] and data["files"] == built.manifest["files"]
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = run_socc("run", tmp_path / "cli", "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz")
    assert result.code == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["y"], built.run({"x": x})["y"])


def test_verify_exit_codes(tmp_path: Path, tiny_mlp: Path, built: toolchain.Artifact) -> None:
    ok = run_socc("verify", built.path, "--model", tiny_mlp, "--json")
    assert ok.code == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] and report["outputs"][0]["max_rel"] <= 1e-4
    # A different model with the same signature: verification must fail with exit 1.
    import onnx

    other = onnx.load(tiny_mlp)
    other.graph.initializer[1].raw_data = (np.frombuffer(other.graph.initializer[1].raw_data, np.float32) + 1).tobytes()
    onnx.save(other, tmp_path / "other.onnx")
    bad = run_socc("verify", built.path, "--model", tmp_path / "other.onnx")
    assert bad.code == 1 and "FAIL" in bad.stdout


def test_verify_finds_the_source_model_by_hash(tmp_path: Path, tiny_mlp: Path) -> None:
    import shutil

    art = toolchain.compile(tiny_mlp, "host", tmp_path / "art", progress=False)
    with pytest.raises(toolchain.UserError, match="not found next to"):
        toolchain.verify(art)
    shutil.copyfile(tiny_mlp, tmp_path / "renamed.onnx")  # found by content, whatever its name
    report = toolchain.verify(art)
    assert report.ok and Path(report.reference).name == "renamed.onnx"


def test_wrong_inputs_are_refused(built: toolchain.Artifact) -> None:
    with pytest.raises(toolchain.UserError, match="missing"):
        built.run({"z": np.zeros((1, 16), np.float32)})
    with pytest.raises(toolchain.UserError, match="dtype"):
        built.run({"x": np.zeros((1, 16), np.float64)})
    with pytest.raises(toolchain.UserError, match="shape"):
        built.run({"x": np.zeros((1, 15), np.float32)})


def test_rebuild_replays_the_recorded_options(tmp_path: Path, tiny_mlp: Path) -> None:
    import shutil

    shutil.copyfile(tiny_mlp, tmp_path / "model.onnx")
    first = toolchain.compile(tmp_path / "model.onnx", "host", tmp_path / "a", shape={"x": [2, 16]},
                              skip_pass=["fuse-kernels"], progress=False)
    assert first.inputs[0]["shape"] == [2, 16]
    result = run_socc("rebuild", first.path, "-o", tmp_path / "b", "--json", "--quiet")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["identical"] is True
    assert toolchain.load(tmp_path / "b").manifest == first.manifest
