"""The artifact: a folder (or .tar.gz) an app team ships, with a manifest that checks every file.

This module is the runtime side: loading and running needs the TVM runtime only (or, for a cross
target, the artifact's own runner under an emulator), never the compiler.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_LIB = "model.so"
RUNNER = "run_model"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": sha256_bytes(data)}


def dump_json(data: Any) -> str:
    """Stable JSON: sorted keys, fixed indentation, trailing newline (same data, same bytes)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------- writing


def finalize_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Adds every file's size and SHA-256 to the manifest and writes it into `folder`."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = file_entry(path)
    manifest = dict(manifest, files=files)
    (folder / MANIFEST).write_text(dump_json(manifest))
    return manifest


def staging_dir(output: Path) -> Path:
    """A temp folder beside the destination (same filesystem, so the final rename is one step).

    Its name carries our PID, so folders left by a killed build can be told apart and swept.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(output)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))


def sweep_staging(output: Path) -> None:
    """Removes staging folders for `output` whose build process no longer runs."""
    for path in output.parent.glob(f".{output.name}.tmp-*"):
        pid = path.name.removeprefix(f".{output.name}.tmp-").split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _renameat2() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange_supported() -> bool:
    return _renameat2() is not None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with renameat2(RENAME_EXCHANGE); False if either is missing or unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def commit_dir(staged: Path, output: Path) -> None:
    """Moves a finished folder into place: the old artifact or the new one, never half of either.

    Safe against a concurrent build of the same output: whichever commits last wins, whole.
    """
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} exists and is not a folder")
    for _ in range(10):
        try:
            os.rename(staged, output)  # no artifact there yet
            break
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _exchange(staged, output):
            shutil.rmtree(staged)  # now holds the old artifact
            break
        if not _exchange_supported():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.rename(output, old)
            os.rename(staged, output)
            shutil.rmtree(old)
            break
    else:
        raise UserError(f"could not move the new artifact into {output}: it keeps changing under us")
    _fsync_dir(output.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_archive(folder: Path, archive: Path) -> None:
    """A reproducible .tar.gz of the folder: sorted members, zero times and owners, written atomically."""
    buffer = io.BytesIO()
    import gzip

    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder).as_posix()
                info = tarfile.TarInfo(f"{archive.name.removesuffix('.tar.gz')}/{rel}")
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    data = path.read_bytes()
                    info.size, info.mode = len(data), 0o755 if os.access(path, os.X_OK) else 0o644
                    tar.addfile(info, io.BytesIO(data))
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, archive)


# ---------------------------------------------------------------- npy files for the runner


def save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


# ---------------------------------------------------------------- loading and running


class Artifact:
    """A built model: its manifest, its files (checked), and a way to run it here."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.timings: dict[str, float] = {}  # seconds per build stage, when this object came from a build
        self._vm: Any = None

    # -- facts
    @property
    def target(self) -> dict[str, Any]:
        return self.manifest["target"]

    @property
    def is_host(self) -> bool:
        return self.target["triple"] == "host"

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, target={self.target['name']!r})"

    # -- loading
    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        """Opens an artifact folder, refusing it if any file differs from the manifest."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{path}: not a socc artifact (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise ArtifactError(f"{manifest_path}: corrupt manifest (not JSON)") from None
        if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"{manifest_path}: unsupported manifest schema {manifest.get('schema_version') if isinstance(manifest, dict) else None!r}")
        artifact = cls(path, manifest)
        artifact.check_files()
        return artifact

    def check_files(self) -> None:
        root = self.path.resolve()
        for rel, entry in sorted(self.manifest.get("files", {}).items()):
            file = (root / rel).resolve()
            if root not in file.parents:
                raise ArtifactError(f"{self.path}: manifest names a file outside the artifact: {rel}")
            if not file.is_file():
                raise ArtifactError(f"{self.path}: missing file {rel}")
            actual = file_entry(file)
            if actual["size"] != entry["size"]:
                raise ArtifactError(f"{self.path}: {rel} is {actual['size']} bytes, the manifest says {entry['size']} (truncated or replaced)")
            if actual["sha256"] != entry["sha256"]:
                raise ArtifactError(f"{self.path}: {rel} fails its SHA-256 check (tampered or corrupt)")

    # -- running
    def _ordered_inputs(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        names = [spec["name"] for spec in self.inputs]
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise UserError(f"inputs do not match the model: missing {missing}, unexpected {extra}; expected {names}")
        arrays = []
        for spec in self.inputs:
            array = np.asarray(inputs[spec["name"]])
            if str(array.dtype) != spec["dtype"]:
                raise UserError(f"input {spec['name']!r}: dtype {array.dtype}, the model takes {spec['dtype']}")
            shape = spec["shape"]
            if len(array.shape) != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, array.shape)):
                raise UserError(f"input {spec['name']!r}: shape {list(array.shape)}, the model takes {shape}")
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def run(self, inputs: Mapping[str, Any], *, repeat: int = 0) -> dict[str, np.ndarray]:
        """Runs the model once on named inputs and returns named outputs."""
        arrays = self._ordered_inputs(inputs)
        results = self._run_host(arrays) if self.is_host else self._run_emulated(arrays, repeat)[0]
        names = [spec["name"] for spec in self.outputs]
        if len(results) != len(names):
            raise ArtifactError(f"model returned {len(results)} outputs, the manifest lists {len(names)}")
        return dict(zip(names, results))

    def time_host(self, inputs: Mapping[str, Any], warmup: int, runs: int) -> list[float]:
        """Milliseconds of each of `runs` calls of main after `warmup` calls, inputs already on the device."""
        import time

        import tvm

        if not self.is_host:
            raise ArtifactError(f"target {self.target['name']} runs on a phone: timing it under an emulator here says nothing about its speed")
        arrays = self._ordered_inputs(inputs)
        self._run_host(arrays)  # loads the library and the VM
        tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
        main = self._vm["main"]
        for _ in range(warmup):
            main(*tensors)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            main(*tensors)
            times.append((time.perf_counter() - start) * 1000)
        return times

    def _run_host(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        if self._vm is None:
            lib = tvm.runtime.load_module(str(self.path / MODEL_LIB))
            self._vm = VirtualMachine(lib, tvm.cpu())
        device = tvm.cpu()
        result = self._vm["main"](*[tvm.runtime.tensor(a, device) for a in arrays])
        return _flatten(result)

    def _run_emulated(self, arrays: Sequence[np.ndarray], repeat: int = 0) -> tuple[list[np.ndarray], str]:
        emulator = self.target.get("emulator") or []
        if not emulator:
            raise ArtifactError(f"target {self.target['name']} cannot run on this machine (no emulator in its profile); copy the artifact to a device and use its {RUNNER}")
        if shutil.which(emulator[0]) is None:
            raise ArtifactError(f"{emulator[0]} not found: `make install` installs qemu-user")
        runner = self.path / RUNNER
        if not runner.is_file():
            raise ArtifactError(f"{self.path}: no {RUNNER} in the artifact")
        if self.target.get("runtime") == "static":
            return self._run_static(emulator, runner, arrays), ""
        with tempfile.TemporaryDirectory(prefix="socc-run-") as tmp:
            tmp_path = Path(tmp)
            in_files = []
            for i, array in enumerate(arrays):
                in_files.append(tmp_path / f"in_{i}.npy")
                save_npy(in_files[-1], array)
            out_dir = tmp_path / "out"
            out_dir.mkdir()
            command = [*emulator, str(runner), str(self.path / MODEL_LIB), str(out_dir), *map(str, in_files)]
            if repeat:
                command += ["--repeat", str(repeat)]
            proc = _emulate(command)
            outputs = sorted(out_dir.glob("out_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
            return [load_npy(p) for p in outputs], proc.stdout


    def _run_static(self, emulator: Sequence[str], program: Path, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The static program takes raw tensors: input files, then output files, in manifest order."""
        with tempfile.TemporaryDirectory(prefix="socc-run-") as tmp:
            tmp_path = Path(tmp)
            in_files = [tmp_path / f"in_{i}.bin" for i in range(len(arrays))]
            for file, array in zip(in_files, arrays):
                file.write_bytes(array.tobytes())
            out_files = [tmp_path / f"out_{i}.bin" for i in range(len(self.outputs))]
            _emulate([*emulator, str(program), *map(str, in_files + out_files)])
            return [np.fromfile(f, dtype=spec["dtype"]).reshape(spec["shape"]) for f, spec in zip(out_files, self.outputs)]


def _emulate(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs the artifact's program under its emulator (command[0]); a failure is one ArtifactError line."""
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ArtifactError(f"{RUNNER} under {command[0]} failed: {last}")
    return proc


def _flatten(value: Any) -> list[np.ndarray]:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    flat: list[np.ndarray] = []
    for item in value:
        flat.extend(_flatten(item))
    return flat


def open_artifact(path: str | Path) -> Artifact:
    """An artifact folder, or a .tar.gz (extracted safely beside itself)."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".tar.gz"):
        return Artifact.load(extract_archive(path))
    return Artifact.load(path)


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Only plain files and folders, with relative names that stay inside the destination."""
    kind = "file" if member.isfile() else "folder" if member.isdir() else None
    if kind is None:
        what = "link" if member.issym() or member.islnk() else "device or special file"
        raise ArtifactError(f"{archive}: refused archive member {member.name!r}: a {what}")
    parts = Path(member.name).parts
    if member.name.startswith("/") or ".." in parts or not parts:
        raise ArtifactError(f"{archive}: refused archive member {member.name!r}: its path leaves the folder")


def extract_archive(archive: Path) -> Path:
    """Extracts a socc .tar.gz into a folder next to it; refuses links, devices and escaping names."""
    destination = archive.with_name(archive.name.removesuffix(".tar.gz") + ".extracted")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            staged = staging_dir(destination)
            try:
                tar.extractall(staged, members=members, filter="data")
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArtifactError(f"{archive}: refused or unreadable archive: {exc}") from None
    roots = list(staged.iterdir())
    if len(roots) != 1 or not roots[0].is_dir():
        shutil.rmtree(staged, ignore_errors=True)
        raise ArtifactError(f"{archive}: expected one top-level folder in the archive")
    os.rename(roots[0], staged / ".artifact")
    inner = staged / ".artifact"
    commit_dir(inner, destination)
    shutil.rmtree(staged, ignore_errors=True)
    return destination
