"""Target build: Relax module (after the passes) -> VM executable -> model.so for the target."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .errors import BuildError, UserError
from .targets import TargetProfile


def check_toolchain(profile: TargetProfile) -> None:
    """Refuse early, in one line, when the profile's compiler is not installed."""
    if profile.is_host:
        return
    if not profile.cxx or shutil.which(profile.cxx[0]) is None:
        raise UserError(
            f"target {profile.name}: compiler {profile.cxx[0] if profile.cxx else '(none)'} not found; "
            "`make install` installs the Debian cross toolchain (g++-aarch64-linux-gnu)"
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
        else:
            fcompile = cc.cross_compiler(profile.cxx[0], options=list(profile.cxx[1:]))
            executable.export_library(str(path), fcompile=fcompile)
    except Exception as exc:  # noqa: BLE001
        lines = str(exc).strip().splitlines()
        raise BuildError(f"linking model.so for {profile.name} failed: {lines[-1] if lines else exc}") from exc
