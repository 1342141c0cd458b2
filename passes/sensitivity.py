"""Layer sensitivity for `--max-accuracy-drop`: one module, any subset of layers quantized.

The quantize pass builds `main` with an extra input, a bool vector: layer i computes
`where(flags[i], int8 result, float result)`. Compiled once for the host, it runs on the
calibration samples with all flags off (the float reference), one flag on (that layer's
sensitivity: the SQNR of the outputs when only it is quantized), and any set (the end-to-end
error of a candidate plan: 1 - cosine of all float outputs, concatenated, per sample, averaged),
on the first MAX_SAMPLES calibration samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import itertools

import numpy as np

from .base import PassInputError

# The first samples of the calibration set measure sensitivity (they are held in memory, with
# their float outputs, for the many runs the search makes).
MAX_SAMPLES = 32


class Switchboard:
    def __init__(self, mod: Any, count: int, samples: Callable[[], Iterator[Mapping[str, np.ndarray]]] | None) -> None:
        import tvm
        from tvm import relax

        if samples is None:
            raise PassInputError("--max-accuracy-drop needs calibration data")
        main = mod["main"]
        num_input = int(main.attrs["num_input"])
        self.names = [str(p.name) for p in main.params[:num_input - 1]]
        self.count = count
        self.vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
        self.samples = [[tvm.runtime.tensor(np.ascontiguousarray(s[name])) for name in self.names]
                        for s in itertools.islice(samples(), MAX_SAMPLES)]
        if not self.samples:
            raise PassInputError("--max-accuracy-drop: the calibration data gave no samples on a second read (pass a path or a list, not a generator)")
        self.reference = [self._run(args, [False] * count) for args in self.samples]

    def _run(self, args: Sequence[Any], flags: Sequence[bool]) -> np.ndarray:
        import tvm

        result = self.vm["main"](*args, tvm.runtime.tensor(np.array(flags, dtype=bool)))
        outputs = [result] if hasattr(result, "numpy") else list(result)
        parts = [o.numpy().astype(np.float64).ravel() for o in outputs if str(o.dtype).startswith("float")]
        return np.concatenate(parts) if parts else np.zeros(1)

    def sqnr_alone(self) -> list[float]:
        """Per layer, the outputs' SQNR in dB with only that layer quantized (lower = more sensitive)."""
        values = []
        for i in range(self.count):
            flags = [j == i for j in range(self.count)]
            noise = signal = 0.0
            for args, ref in zip(self.samples, self.reference):
                out = self._run(args, flags)
                noise += float(np.sum((out - ref) ** 2))
                signal += float(np.sum(ref ** 2))
            values.append(float(10 * np.log10(signal / noise)) if noise > 0 else float("inf"))
        return values

    def drop(self, flags: Sequence[bool]) -> float:
        """Mean over samples of 1 - cosine(outputs with `flags`, float outputs)."""
        losses = []
        for args, ref in zip(self.samples, self.reference):
            out = self._run(args, flags)
            norms = float(np.linalg.norm(out) * np.linalg.norm(ref))
            losses.append(1.0 - (float(out @ ref) / norms if norms > 0 else 1.0))
        return float(np.mean(losses))
