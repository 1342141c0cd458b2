"""Calibration data for int8 quantization: `.npz` files, a folder of them, or a Python iterable.

A `.npz` holds one array per model input with a leading sample axis: `images` of shape
[samples, 1, 3, 96, 96] gives one sample [1, 3, 96, 96] at a time. An array whose rank equals
the input's own rank (no extra axis) is split along its first axis into batches of the input's
fixed first dim, or of one when that dim is symbolic ([samples, 3, 96, 96] -> [1, 3, 96, 96]);
a remainder shorter than a batch is dropped. A folder is read file by file in name order, so memory
holds one file at a time, never the whole set; samples are yielded one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

Sample = dict[str, np.ndarray]
SampleSource = Callable[[], Iterator[Sample]]


def calibration_source(
    calibration: str | Path | Iterable[Mapping[str, Any]],
    input_shapes: Mapping[str, Sequence[int | str]],
) -> SampleSource:
    """A factory of fresh sample iterators (calibration may be read more than once).

    `input_shapes` maps each model input to its shape (ints, or names of symbolic dims); every
    sample must name every input.
    A Python iterable is read as it is given (a list can be read again; a generator once).
    """
    if isinstance(calibration, (str, Path)):
        path = Path(calibration)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise UserError(f"{path}: calibration folder holds no .npz files")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"{path}: no such calibration file or folder")
        return lambda: (sample for f in files for sample in _npz_samples(f, input_shapes))
    if isinstance(calibration, Mapping) or not isinstance(calibration, Iterable):
        raise UserError("calibration must be a .npz path, a folder of .npz files, or an iterable of input dicts")
    items = calibration

    def from_iterable() -> Iterator[Sample]:
        for i, item in enumerate(items):
            yield _checked(item, input_shapes, f"calibration sample {i}")

    return from_iterable


def _npz_samples(path: Path, input_shapes: Mapping[str, Sequence[int | str]]) -> Iterator[Sample]:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not a .npz file of arrays ({exc})") from None
    with data:
        missing = sorted(set(input_shapes) - set(data.files))
        if missing:
            raise UserError(f"{path}: no array for model input {missing[0]!r} (has: {', '.join(data.files) or 'none'})")
        arrays = {name: data[name] for name in input_shapes}
    steps = {name: _sample_step(name, a, input_shapes[name], path) for name, a in arrays.items()}
    counts = {name: arrays[name].shape[0] // max(step, 1) for name, step in steps.items()}
    if len(set(counts.values())) > 1:
        raise UserError(f"{path}: inputs hold different sample counts: {counts}")
    for i in range(next(iter(counts.values()), 0)):
        yield {name: _take_sample(a, i, steps[name]) for name, a in arrays.items()}


def _sample_step(name: str, array: np.ndarray, shape: Sequence[int | str], path: Path) -> int:
    """0 when the array has a sample axis of its own, else the batch size to split it into."""
    rank = len(shape)
    if array.ndim not in (rank, rank + 1) or array.ndim == 0:
        raise UserError(f"{path}: input {name!r} has rank {array.ndim}; expected {rank + 1} (samples first) or {rank}")
    if array.ndim == rank + 1:
        return 0
    return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1


def _take_sample(array: np.ndarray, i: int, step: int) -> np.ndarray:
    return np.ascontiguousarray(array[i] if step == 0 else array[i * step:(i + 1) * step])


def _checked(item: Mapping[str, Any], input_shapes: Mapping[str, Sequence[int | str]], where: str) -> Sample:
    if not isinstance(item, Mapping):
        raise UserError(f"{where}: expected a dict of input name -> array, got {type(item).__name__}")
    missing = sorted(set(input_shapes) - set(item))
    if missing:
        raise UserError(f"{where}: no array for model input {missing[0]!r}")
    sample = {name: np.ascontiguousarray(np.asarray(item[name])) for name in input_shapes}
    for name, array in sample.items():
        if array.ndim != len(input_shapes[name]):
            raise UserError(f"{where}: input {name!r} has rank {array.ndim}; the model's is {len(input_shapes[name])}")
    return sample


def calibration_description(calibration: str | Path | Iterable[Any] | None) -> str | None:
    """How the calibration was given, for the manifest (a path, or that it came from Python)."""
    if calibration is None:
        return None
    return str(calibration) if isinstance(calibration, (str, Path)) else "python iterable"
