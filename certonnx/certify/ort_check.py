"""Independent re-check of counterexamples with onnxruntime on the ORIGINAL ONNX file.

A falsification is only reported when the file the user gave us, run by a different engine,
misbehaves on the point we found. This guards against any mismatch between the imported torch
graph and the ONNX semantics (and against our own bugs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from certonnx.errors import ModelLoadError


class OrtRunner:
    """Runs the original ONNX file on batches of raw inputs ``(N, *sample_shape)``.

    ``mean``/``std`` (user-declared normalization, not inside the file) are applied before the
    file is run, because the file itself expects normalized inputs.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {e}") from e
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        self.input_dims = list(inp.shape)
        b0 = self.input_dims[0] if self.input_dims else None
        # a file exported with a fixed batch (1, or e.g. 3) is run in chunks of exactly that size
        self.fixed_batch = int(b0) if isinstance(b0, int) and b0 > 0 else 0
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x = (x - self.mean.reshape(shape)) / self.std.reshape(shape)
        return x.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``(N, K)`` (flattened per sample)."""
        x = self._prep(x)
        dims = [d if isinstance(d, int) and d > 0 else None for d in self.input_dims[1:]]
        if all(d is not None for d in dims):
            x = x.reshape(x.shape[0], *dims)  # type: ignore[arg-type]
        if self.fixed_batch:
            k, n = self.fixed_batch, x.shape[0]
            outs = []
            for i in range(0, n, k):
                chunk = x[i : i + k]
                if chunk.shape[0] < k:  # pad the last chunk with copies of its last sample
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], k - chunk.shape[0], 0)], 0)
                outs.append(self.sess.run(None, {self.input_name: chunk})[0].reshape(k, -1))
            out = np.concatenate(outs, 0)[:n]
        else:
            out = self.sess.run(None, {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float64).reshape(x.shape[0], -1)


def margin_violated(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Misclassified per sample: some other class scores at least as high as the label."""
    true = out[np.arange(out.shape[0]), y]
    other = out.copy()
    other[np.arange(out.shape[0]), y] = -np.inf
    return other.max(1) >= true


def condition_holds(out: np.ndarray, disjuncts: list[tuple[np.ndarray, np.ndarray]], atol: float = 0.0) -> np.ndarray:
    """VNN-LIB output condition per sample: some disjunct with every row ``A y <= b + atol``."""
    ok = np.zeros(out.shape[0], dtype=bool)
    for A, b in disjuncts:
        v = out @ np.asarray(A, dtype=np.float64).T - np.asarray(b, dtype=np.float64)
        ok |= np.all(v <= atol, axis=1)
    return ok
