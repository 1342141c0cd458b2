"""Target build: Relax module (after the passes) -> VM executable -> model.so for the target."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .errors import BuildError, UserError
from .targets import TargetProfile


def check_toolchain(profile: TargetProfile) -> None:
    """Refuse early, in one line, when the profile's compiler is not installed."""
    if profile.is_host:
        return
    tools = [profile.cc, profile.ld] if profile.is_static else [profile.cxx]
    for command in tools:
        if not command or shutil.which(command[0]) is None:
            raise UserError(
                f"target {profile.name}: compiler {command[0] if command else '(none)'} not found; "
                "`make install` installs the Debian cross toolchains (g++-aarch64-linux-gnu, clang, lld)"
            )


def codegen(mod: Any, target: Any) -> Any:
    """Generates the VM executable. Our passes already lowered the module, so no Relax pipeline runs here."""
    import tvm

    try:
        return tvm.compile(mod, target=target, relax_pipeline=None)
    except Exception as exc:  # noqa: BLE001
        lines = str(exc).strip().splitlines()
        raise BuildError(f"code generation failed: {type(exc).__name__}: {lines[-1] if lines else ''}") from exc


def export_model(executable: Any, profile: TargetProfile, path: Path) -> None:
    """Writes the executable as a shared library for the target (cross-linked unless host)."""
    from tvm.support import cc

    try:
        if profile.is_host:
            executable.export_library(str(path))
        elif profile.ld:
            executable.export_library(str(path), fcompile=_linker(profile.ld))
        else:
            fcompile = cc.cross_compiler(profile.cxx[0], options=list(profile.cxx[1:]))
            executable.export_library(str(path), fcompile=fcompile)
    except Exception as exc:  # noqa: BLE001
        lines = str(exc).strip().splitlines()
        raise BuildError(f"linking model.so for {profile.name} failed: {lines[-1] if lines else exc}") from exc


def _linker(ld: tuple[str, ...]) -> Any:
    """An `fcompile` for export_library that links TVM's objects into a shared object with `ld` alone."""

    def link(output: str, objects: list[str], options: Any = None) -> None:
        done = subprocess.run([*ld, "-shared", "-o", output, *objects], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"{ld[0]} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")

    link.output_format = "so"  # type: ignore[attr-defined]
    return link


def write_kernels_object(executable: Any, path: Path) -> None:
    """The kernels TVM compiled (one object file, entry points `__tvm_ffi_<kernel>`)."""
    libraries = [m for m in executable.mod.imports if m.kind == "llvm"]
    if len(libraries) != 1:
        raise BuildError(f"expected one compiled kernel library, found {len(libraries)}")
    libraries[0].write_to_file(str(path))


def kernel_instruction_counts(executable: Any, vector_pattern: str) -> dict[str, dict[str, int]]:
    """Per kernel: instructions in its compute body, how many use the vector unit, and its argument-checking wrapper.

    Counted in the assembly of the LLVM that built the kernels (one instruction per line; a Hexagon
    packet's `{ }` lines hold several). An instruction is a vector one when it matches `vector_pattern`
    (the profile's: HVX `v`/`q` registers and `vmem` on Hexagon)."""
    pattern = re.compile(vector_pattern)
    libraries = [m for m in executable.mod.imports if m.kind == "llvm"]
    counts: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in (libraries[0].inspect_source("asm") if libraries else "").splitlines():
        label = _LABEL.match(line)
        if label:
            name = label.group(2)
            kernel, part = (name[: -len("_compute_")], "body") if name.endswith("_compute_") else (name, "wrapper")
            if label.group(1) is None and part == "wrapper":
                current = None  # a helper (e.g. __truncsfhf2), not a kernel
                continue
            current = counts.setdefault(kernel, {"instructions": 0, "vector_instructions": 0, "wrapper_instructions": 0})
            current["_part"] = part == "body"
            continue
        text = line.strip().strip("{}").strip()
        if current is None or not text or text.startswith((".", "//", "#")) or text.endswith(":"):
            continue
        if current["_part"]:
            current["instructions"] += 1
            current["vector_instructions"] += bool(pattern.search(text))
        else:
            current["wrapper_instructions"] += 1
    for entry in counts.values():
        entry.pop("_part", None)
    return counts


_LABEL = re.compile(r"^(__tvm_ffi_)?([A-Za-z_][\w.]*):")
