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
    for command in [*tools, *([profile.objdump] if profile.objdump else [])]:
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


def export_model(executable: Any, profile: TargetProfile, path: Path, keep_kernels: Path | None = None) -> None:
    """Writes the executable as a shared library for the target (cross-linked unless host).

    With `keep_kernels` (profiles linked by `ld`), the kernels' object file TVM compiled for the
    library is also copied there, so a static program can link the same code without compiling again."""
    from tvm.support import cc

    try:
        if profile.is_host:
            executable.export_library(str(path))
        elif profile.ld:
            executable.export_library(str(path), fcompile=_linker(profile.ld, keep_kernels))
        else:
            fcompile = cc.cross_compiler(profile.cxx[0], options=list(profile.cxx[1:]))
            executable.export_library(str(path), fcompile=fcompile)
    except Exception as exc:  # noqa: BLE001
        lines = str(exc).strip().splitlines()
        raise BuildError(f"linking model.so for {profile.name} failed: {lines[-1] if lines else exc}") from exc


def run_tool(command: list[str], what: str, cwd: Path | None = None) -> str:
    """Runs a build tool and returns its stdout; a failure (or a tool that cannot start) is one BuildError line."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BuildError(f"{what} failed: cannot run {command[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        text = (done.stderr or done.stdout).strip().splitlines()
        raise BuildError(f"{what} failed ({command[0]}): {text[0] if text else f'exit code {done.returncode}'}")
    return done.stdout


def _linker(ld: tuple[str, ...], keep_kernels: Path | None = None) -> Any:
    """An `fcompile` for export_library that links TVM's objects into a shared object with `ld` alone.

    TVM hands it the kernels' object and `devc.o` (the packed VM executable); with `keep_kernels`
    the kernels' object is copied there."""

    def link(output: str, objects: list[str], options: Any = None) -> None:
        if keep_kernels is not None:
            kernels = [o for o in objects if Path(o).name != "devc.o"]
            if len(kernels) != 1:
                raise BuildError(f"expected one kernel object from TVM, got {[Path(o).name for o in objects]}")
            shutil.copyfile(kernels[0], keep_kernels)
        run_tool([*ld, "-shared", "-o", output, *objects], "linking model.so")

    link.output_format = "so"  # type: ignore[attr-defined]
    return link


def kernel_instruction_counts(binary: Path, objdump: tuple[str, ...], vector_pattern: str) -> dict[str, dict[str, int]]:
    """Per kernel of a built library: instructions in its compute body, how many use the vector unit,
    and the instructions of its argument-checking wrapper (`__tvm_ffi_<kernel>`).

    Counted in the disassembly of the binary that ships (`objdump`, the profile's command); an
    instruction is a vector one when it matches `vector_pattern` (HVX: `v`/`q` registers, `vmem`)."""
    disassembly = run_tool([*objdump, str(binary)], f"disassembling {binary.name}")
    pattern = re.compile(vector_pattern)
    counts: dict[str, dict[str, int]] = {}
    current: tuple[dict[str, int], str] | None = None
    for line in disassembly.splitlines():
        symbol = _SYMBOL.match(line)
        if symbol:
            name = symbol.group(1)
            if name.startswith("__tvm_ffi_") and not name.startswith("__tvm_ffi__"):
                current = (counts.setdefault(name[len("__tvm_ffi_"):], _empty_counts()), "wrapper_instructions")
            elif name.endswith("_compute_"):
                current = (counts.setdefault(name[: -len("_compute_")], _empty_counts()), "instructions")
            else:
                current = None
            continue
        if current is None or ":\t" not in line:
            continue
        text = line.rsplit("\t", 1)[-1].strip().strip("{}").strip()
        if not text:
            continue
        entry, key = current
        entry[key] += 1
        if key == "instructions" and pattern.search(text):
            entry["vector_instructions"] += 1
    return counts


def _empty_counts() -> dict[str, int]:
    return {"instructions": 0, "vector_instructions": 0, "wrapper_instructions": 0}


_SYMBOL = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
