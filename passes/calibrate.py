"""Calibration: run the float model on sample inputs and observe chosen intermediate tensors.

The module's `main` is copied with its result replaced by the tapped tensors (each bound to an
output var at the end of its dataflow block), compiled for the host CPU with TVM's default
pipeline, and run once per sample. Each tapped tensor feeds an accumulator: a streaming
`Histogram` (int8 activation ranges) or a `Gram` matrix (GPTQ), so memory holds one sample's
tensors and a fixed-size state per tap, however many samples there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .base import PassInputError
from .observers import Histogram


class CalibrationError(PassInputError):
    """Calibration could not run (no samples, or samples the model rejects)."""


def tapped_main(func: Any, taps: Sequence[Any]) -> Any:
    """`func` returning the values of `taps` (vars bound in its dataflow blocks) as a tuple."""
    from tvm import relax

    wanted = {tap: i for i, tap in enumerate(taps)}
    outputs: list[Any] = [None] * len(taps)
    blocks = []
    for block in func.body.blocks:
        bindings = list(block.bindings)
        exits = []
        for binding in bindings:
            if binding.var in wanted:
                out = relax.Var(f"tap{wanted[binding.var]}", binding.var.ty)
                outputs[wanted[binding.var]] = out
                exits.append(relax.VarBinding(out, binding.var))
        blocks.append(type(block)(bindings + exits) if exits else block)
    for i, tap in enumerate(taps):
        if outputs[i] is None and any(tap.same_as(p) for p in func.params):
            outputs[i] = tap  # an input of the model: returned as it is
    missing = [str(taps[i].name) for i, out in enumerate(outputs) if out is None]
    if missing:
        raise CalibrationError(f"cannot tap {missing[0]}: not bound in main")
    body = relax.SeqExpr(blocks, relax.Tuple(outputs))
    return relax.Function(func.params, body, relax.TupleType([out.ty for out in outputs]), func.is_pure, func.attrs)


class Gram:
    """The running sum of x^T x over the rows of a tapped [..., K] tensor (GPTQ's Hessian), float64."""

    def __init__(self) -> None:
        self.matrix: np.ndarray | None = None
        self.rows = 0

    def update(self, values: np.ndarray) -> None:
        rows = values.reshape(-1, values.shape[-1]).astype(np.float64)
        product = rows.T @ rows
        self.matrix = product if self.matrix is None else self.matrix + product
        self.rows += rows.shape[0]


def collect_histograms(
    mod: Any,
    taps: Sequence[Any],
    samples: Callable[[], Iterator[Mapping[str, np.ndarray]]],
    bins: int = 2048,
) -> tuple[list[Histogram], int]:
    """Histograms of every tap over all samples, and the number of samples seen."""
    return collect(mod, taps, samples, lambda: Histogram(bins))


def collect(
    mod: Any,
    taps: Sequence[Any],
    samples: Callable[[], Iterator[Mapping[str, np.ndarray]]],
    accumulator: Callable[[], Any],
) -> tuple[list[Any], int]:
    """One `accumulator()` per tap, updated with the tap's value on every sample; and the sample count."""
    import tvm
    from tvm import relax

    if not taps:
        return [], 0
    main = mod["main"]
    observed = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    observed["main"] = tapped_main(main, taps)
    num_input = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else len(main.params)
    names = [str(p.name) for p in main.params[:num_input]]
    executable = tvm.compile(observed, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    histograms = [accumulator() for _ in taps]
    count = 0
    for sample in samples():
        args = [tvm.runtime.tensor(np.ascontiguousarray(sample[name])) for name in names]
        try:
            results = vm["main"](*args)
        except Exception as exc:  # noqa: BLE001 - TVM's shape/dtype check, one line
            text = str(exc).strip().splitlines()
            raise CalibrationError(f"calibration sample {count} does not fit the model: {text[-1] if text else exc}") from None
        for hist, value in zip(histograms, results):
            hist.update(value.numpy())
        count += 1
    if count == 0:
        raise CalibrationError("calibration data holds no samples")
    return histograms, count
