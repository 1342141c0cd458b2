"""GPTQ for int4-weight matmuls: rounding that compensates its own error (Frantar et al., 2022).

For y = x W with W [K, N], calibration gives H = sum of x^T x over the rows of x. Rows of W are
quantized one at a time in order; the error each row leaves, scaled by the inverse Hessian's
Cholesky factor, is pushed onto the rows not yet quantized, so the layer's output error on the
calibration inputs (not the weight error) is what is minimized. Groups of G rows share a scale and
zero point (`quantize.int4_group_params`), fitted when the quantization reaches the group's first
row, to the already-updated values. Lazy batch updates in blocks of BLOCK rows, numpy float64.
"""

from __future__ import annotations

import numpy as np

# Rows per lazy-update block (a multiple of every group size).
BLOCK = 128
# Dampening added to H's diagonal, as a fraction of its mean (keeps the Cholesky factor stable).
DAMP = 0.01


def gptq_int4(weight: np.ndarray, gram: np.ndarray, group: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [K, N] (uint8 0..15), scales [K/G, N] float16, zero points [K/G, N] float32."""
    from .quantize import int4_group_params

    k, n = weight.shape
    w = weight.astype(np.float64).copy()
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    # upper Cholesky factor of H^-1: row i holds how row i's error spreads to the rows after it
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((k, n), np.uint8)
    scales = np.zeros((k // group, n), np.float16)
    zeros = np.zeros((k // group, n), np.float32)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = w[start:end].copy()
        errors = np.zeros_like(block)
        for i in range(end - start):
            row = start + i
            if row % group == 0:
                g = row // group
                scale, zero = int4_group_params(block[i:i + group][None].astype(np.float32), symmetric)
                scales[g], zeros[g] = scale[0], zero[0]
            g = row // group
            s32 = scales[g].astype(np.float64)
            q = np.clip(np.rint(block[i] / s32) + zeros[g], 0, 15)
            codes[row] = q.astype(np.uint8)
            error = (block[i] - (q - zeros[g]) * s32) / u[row, row]
            block[i + 1:] -= np.outer(u[row, row + 1:end], error)
            errors[i] = error
        w[end:] -= u[start:end, end:].T @ errors
    return codes, scales, zeros
