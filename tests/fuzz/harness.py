"""Fuzz socc's compile path with mutated real ONNX models.

    python tests/fuzz/harness.py --cases 10000 --workers 2      (make fuzz)

Every case must end in success or one clean SoccError. A case that kills or hangs the in-process
worker is replayed through `socc compile` (isolated child with limits): if that ends in one clean
line it counts as a contained native crash (reported, not a failure). Anything else is a finding: a Python
exception that is not ours (a traceback in the CLI), a native crash (the worker dies by a signal),
a hang (no answer within --timeout) or memory beyond the worker's address-space bound. Workers
are long-lived child processes (TVM is imported once) and are restarted after a crash or hang.
Findings are written to --findings for replay.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO), str(HERE), str(HERE.parent)]

from mutate import make_case  # noqa: E402

MARK = "@@socc-fuzz@@ "
WORKER_MEMORY = 8 << 30


def seed_models() -> list[bytes]:
    """Real models small enough for many cases: an MLP, a conv net with BN and a residual, multi-IO."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from conftest import tiny_mlp_model

    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv_w")
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("bn_s", rng.random(8) + 0.5), ("bn_b", rng.standard_normal(8)), ("bn_m", rng.standard_normal(8)), ("bn_v", rng.random(8) + 0.5))]
    fc_w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc_w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[1, 1]),
            helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["b"], name="bn"),
            helper.make_node("Relu", ["b"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "b"], ["res"], name="residual"),
            helper.make_node("GlobalAveragePool", ["res"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
            helper.make_node("MatMul", ["f", "fc_w"], ["logits"], name="fc"),
            helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        ],
        "small_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 4])],
        [conv_w, *bn, fc_w],
    )
    cnn = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    seeds = [tiny_mlp_model().SerializeToString(), cnn.SerializeToString()]
    try:
        from examples.models import multi_io

        with tempfile.TemporaryDirectory() as tmp:
            seeds.append(multi_io(Path(tmp) / "m.onnx").read_bytes())
    except ImportError:
        pass
    onnx.checker.check_model(cnn)
    return seeds


# ---------------------------------------------------------------- worker side


def worker_main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Answers go to the original stdout; anything TVM or LLVM prints goes nowhere.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    import toolchain
    from toolchain.errors import SoccError

    for line in sys.stdin:
        request = json.loads(line)
        status, message = "ok", ""
        try:
            toolchain.compile(request["model"], "host", request["out"], progress=False)
        except SoccError as exc:
            status, message = "clean", str(exc)
            if "\n" in message:
                status = "traceback"  # a clean error is one line
        except MemoryError:
            status, message = "clean", "out of memory (the isolated CLI reports this as one line)"
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer hunts
            status, message = "traceback", f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        shutil.rmtree(request["out"], ignore_errors=True)
        answers.write(MARK + json.dumps({"status": status, "message": message}) + "\n")


# ---------------------------------------------------------------- parent side


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def run(cases: int, seed: int, timeout: float, findings: Path | None, workers: int = 1,
        progress_every: int = 0) -> dict[str, object]:
    seeds = seed_models()
    rng = np.random.default_rng(seed)
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    bad: list[dict[str, str]] = []
    contained: list[dict[str, str]] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="socc-fuzz-") as tmp:
        pool = [Worker() for _ in range(workers)]
        pending: list[tuple[int, bytes, str]] = []
        for i in range(cases):
            data, what = make_case(seeds[int(rng.integers(len(seeds)))], rng)
            pending.append((i, data, what))
        # Workers take cases round-robin; each answers before the next case is sent to it.
        for batch_start in range(0, len(pending), workers):
            batch = pending[batch_start:batch_start + workers]
            sent = []
            for worker_index, (i, data, what) in enumerate(batch):
                model = Path(tmp, f"case{i}.onnx")
                model.write_bytes(data)
                worker = pool[worker_index]
                worker.proc.stdin.write(json.dumps({"model": str(model), "out": str(Path(tmp, f"out{i}"))}) + "\n")
                worker.proc.stdin.flush()
                sent.append((worker_index, i, data, what))
            for worker_index, i, data, what in sent:
                answer = _read_answer(pool[worker_index], timeout)
                if answer["status"] in ("crash", "hang"):
                    answer = replay_isolated(data, Path(tmp), timeout, answer)
                counts[answer["status"]] += 1
                if answer["status"] == "contained":
                    contained.append({"case": str(i), "mutation": what, **answer})
                    if findings is not None:
                        (findings / "contained").mkdir(parents=True, exist_ok=True)
                        Path(findings, "contained", f"case{i}.onnx").write_bytes(data)
                if answer["status"] == "clean":
                    errors[answer["message"].split(":")[0][:60] if "/" not in answer["message"][:40] else answer["message"].split(": ", 1)[-1][:60]] += 1
                elif answer["status"] not in ("ok", "contained"):
                    bad.append({"case": str(i), "mutation": what, **answer})
                    if findings is not None:
                        findings.mkdir(parents=True, exist_ok=True)
                        Path(findings, f"case{i}.onnx").write_bytes(data)
                if not pool[worker_index].alive:
                    pool[worker_index] = Worker()
                Path(tmp, f"case{i}.onnx").unlink(missing_ok=True)
                if progress_every and (i + 1) % progress_every == 0:
                    print(f"fuzz: {i + 1}/{cases} cases, {time.monotonic() - start:.0f} s: {dict(counts)}", flush=True)
        for worker in pool:
            worker.proc.stdin.close()
            worker.kill()
    return {"cases": cases, "seconds": round(time.monotonic() - start, 1), "ok": counts["ok"], "clean_errors": counts["clean"],
            "crashes": counts["crash"], "hangs": counts["hang"], "tracebacks": counts["traceback"],
            "contained_native_crashes": counts["contained"], "contained": contained[:50],
            "top_errors": errors.most_common(12), "findings": bad[:50]}


def replay_isolated(data: bytes, tmp: Path, timeout: float, first: dict[str, str]) -> dict[str, str]:
    """A case that killed or hung an in-process worker, run again as a user runs it: `socc compile`,
    which builds in a child with limits. One clean line with exit 2 means the crash was contained."""
    model = tmp / "replay.onnx"
    model.write_bytes(data)
    command = [sys.executable, "-m", "toolchain", "compile", str(model), "-o", str(tmp / "replay-out"), "-q",
               "--timeout", str(int(timeout))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 60, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return {"status": "hang", "message": f"{first['message']}; the isolated CLI hung too"}
    finally:
        shutil.rmtree(tmp / "replay-out", ignore_errors=True)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode in (0, 2) and len(lines) <= 1 and "Traceback" not in proc.stderr:
        return {"status": "contained", "message": f"in-process {first['status']} ({first['message']}); socc compile: {lines[0] if lines else 'ok'}"}
    return {"status": first["status"], "message": f"{first['message']}; socc compile exit {proc.returncode}: {' | '.join(lines[-2:])}"}


def _read_answer(worker: Worker, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not worker.selector.select(left):
            worker.kill()
            return {"status": "hang", "message": f"no answer in {timeout:.0f} s"}
        line = worker.proc.stdout.readline()
        if not line:
            return {"status": "crash", "message": f"worker died with {worker.proc.wait()}"}
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    if args.worker:
        worker_main()
        return 0
    summary = run(args.cases, args.seed, args.timeout, args.findings, args.workers, progress_every=250)
    print(f"fuzz: {summary['cases']} cases in {summary['seconds']} s: {summary['ok']} built, {summary['clean_errors']} clean errors, "
          f"{summary['crashes']} crashes, {summary['hangs']} hangs, {summary['tracebacks']} tracebacks; "
          f"{summary['contained_native_crashes']} native crashes in-process that `socc compile` contained as one-line errors")
    for case in summary["contained"]:
        print(f"  CONTAINED case {case['case']} ({case['mutation']}): {case['message']}")
    for message, count in summary["top_errors"]:
        print(f"  {count:6d}  {message}")
    for finding in summary["findings"]:
        print(f"  FINDING case {finding['case']} ({finding['mutation']}): {finding['status']}: {finding['message']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if summary["crashes"] == summary["hangs"] == summary["tracebacks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
