"""The child side of an isolated build: `python -m toolchain.worker REQUEST.json` (see isolate.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any

from . import api
from .errors import SoccError
from .isolate import last_stage
from .progress import Progress


def _enter(stage: str, status: IO[str]) -> None:
    status.write(stage + "\n")
    # Fault injection for the isolation tests: die by a real signal when this stage starts.
    if os.environ.get("SOCC_FAULT_STAGE") == stage:
        os.kill(os.getpid(), signal.Signals[os.environ.get("SOCC_FAULT_SIGNAL", "SIGSEGV")])


def main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    kwargs: dict[str, Any] = request["kwargs"]
    with open(request["status"], "a", buffering=1) as status:
        progress = Progress(enabled=kwargs.pop("progress", True), on_start=lambda stage: _enter(stage, status))
        try:
            artifact = api.compile(**kwargs, progress=progress)
            data = {"ok": True, "artifact": str(artifact.path), "seconds": progress.seconds}
        except SoccError as exc:
            data = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
        except MemoryError:
            data = {"ok": False, "kind": "BuildError", "error": f"out of memory in stage {last_stage(Path(request['status']))}"}
        except SystemError as exc:  # a C extension that failed to allocate often returns NULL with no exception set
            data = {"ok": False, "kind": "BuildError",
                    "error": f"out of memory in stage {last_stage(Path(request['status']))} (a native SystemError under the "
                             f"build memory limit: {str(exc).strip()[:80]}); raise --build-memory if the model needs more"}
        except Exception as exc:  # noqa: BLE001 - reported as one line naming the stage
            first = str(exc).strip().splitlines()
            data = {"ok": False, "kind": "BuildError",
                    "error": f"stage {last_stage(Path(request['status']))} failed: {type(exc).__name__}: {first[-1] if first else ''}"}
    Path(request["result"]).write_text(json.dumps(data, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
