"""socc: compile ONNX models into verified artifacts for phone SoCs, on Apache TVM.

    import toolchain
    artifact = toolchain.compile("model.onnx", target="arm-cpu", output="out/")
    report = toolchain.verify(artifact)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import compile, load, rebuild, run, verify  # noqa: E402
from .artifact import Artifact  # noqa: E402
from .errors import ArtifactError, BuildError, SoccError, UserError, VerificationFailed  # noqa: E402
from .verify import VerifyReport  # noqa: E402

__all__ = [
    "Artifact",
    "ArtifactError",
    "BuildError",
    "SoccError",
    "UserError",
    "VerificationFailed",
    "VerifyReport",
    "compile",
    "load",
    "rebuild",
    "run",
    "verify",
]
