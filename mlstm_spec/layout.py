"""Moving sequences between layouts: batch-major (B, T, I), time-major (T, B, I), and Julia's (I, T, B).

Parameters need no conversion: a Julia ``W[r, c]`` is NumPy's ``W[r, c]`` when both are read by logical
index. Sequences do: Julia's feature-first ``(I, T, B)`` holds, logically, NumPy's ``(B, T, I)`` with the
axes reversed. (Its column-major memory is exactly the C-order memory of ``(B, T, I)``, which is why a
raw buffer must never be reinterpreted without knowing which convention wrote it.)
"""

from __future__ import annotations

import numpy as np


def _check_rank(array, argument, ranks):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{argument} must be a numpy.ndarray, got {type(array).__name__}")
    if array.ndim not in ranks:
        raise ValueError(f"{argument} must have {' or '.join(map(str, ranks))} dimensions, got shape {array.shape}")


def to_time_major(xs: np.ndarray) -> np.ndarray:
    """(B, T, ...) -> (T, B, ...)."""
    _check_rank(xs, "xs", (2, 3))
    return np.swapaxes(xs, 0, 1)


def to_batch_major(xs: np.ndarray) -> np.ndarray:
    """(T, B, ...) -> (B, T, ...)."""
    _check_rank(xs, "xs", (2, 3))
    return np.swapaxes(xs, 0, 1)


def from_julia_sequence(xs: np.ndarray) -> np.ndarray:
    """A Julia ``(I, T, B)`` or ``(I, T)`` array, read by logical index, as NumPy ``(B, T, I)`` / ``(T, I)``.

    Also turns a Julia state ``(H, B)`` into ``(B, H)``.
    """
    _check_rank(xs, "xs", (1, 2, 3))
    return np.ascontiguousarray(xs.T)


def to_julia_sequence(xs: np.ndarray) -> np.ndarray:
    """NumPy ``(B, T, I)`` / ``(T, I)`` as the logical Julia ``(I, T, B)`` / ``(I, T)`` array."""
    _check_rank(xs, "xs", (1, 2, 3))
    return np.ascontiguousarray(xs.T)
