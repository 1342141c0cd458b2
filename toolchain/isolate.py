"""Run a build in a child process with time and memory limits.

A native crash inside TVM or LLVM (segfault, abort, runaway memory, a hang) then ends the child,
not the caller, and becomes one clean error naming the stage that was running. Requests and
results cross the process boundary as JSON files: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from .errors import ArtifactError, BuildError, SoccError, UserError, VerificationFailed

DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_MEMORY_BYTES = 16 << 30  # address space; TVM + LLVM + onnxruntime map a few GiB before any work
_ERRORS: dict[str, type[SoccError]] = {
    cls.__name__: cls for cls in (SoccError, UserError, BuildError, ArtifactError, VerificationFailed)
}


def _limit_memory(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def compile_in_child(
    kwargs: dict[str, Any],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> dict[str, Any]:
    """Runs `toolchain.api.compile(**kwargs)` (JSON-able arguments) in a child; returns its result dict."""
    with tempfile.TemporaryDirectory(prefix="socc-build-") as tmp:
        request, status, result = Path(tmp, "request.json"), Path(tmp, "stage"), Path(tmp, "result.json")
        request.write_text(json.dumps({"kwargs": kwargs, "status": str(status), "result": str(result)}))
        command = [sys.executable, "-m", "toolchain.worker", str(request)]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                                preexec_fn=lambda: _limit_memory(memory_bytes), start_new_session=True)  # noqa: PLW1509
        forwarder = threading.Thread(target=_forward_progress, args=(proc.stderr,), daemon=True)
        forwarder.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BuildError(f"build stopped after {timeout:.0f} s in stage {last_stage(status)} (time limit)") from None
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        if result.is_file():
            data = json.loads(result.read_text())
            if data.get("ok"):
                return data
            raise _ERRORS.get(data.get("kind", ""), BuildError)(data.get("error", "build failed"))
        if code < 0:
            name, stage = signal.Signals(-code).name, last_stage(status)
            hint = " (onnxsim crashed: try --no-simplify)" if stage == "simplify" else ""
            raise BuildError(f"the compiler crashed ({name}) in stage {stage}; memory limit {memory_bytes >> 20} MiB{hint}")
        raise BuildError(f"the build process exited with code {code} in stage {last_stage(status)}")


def _forward_progress(stream: IO[str]) -> None:
    """Passes the child's progress lines through; native libraries' noise stays out of the user's way."""
    for line in stream:
        if line.startswith("[socc] "):
            sys.stderr.write(line)
            sys.stderr.flush()


def last_stage(status: Path) -> str:
    """The stage a build was in: the last name the child wrote to its status file."""
    try:
        lines = status.read_text().split()
    except OSError:
        return "start-up"
    return lines[-1] if lines else "start-up"
