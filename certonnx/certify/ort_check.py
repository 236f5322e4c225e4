"""Independent re-check of counterexamples with onnxruntime on the ORIGINAL ONNX file.

A falsification is only reported when the file the user gave us, run by a different engine,
misbehaves on the point we found. This guards against any mismatch between the imported torch
graph and the ONNX semantics (and against our own bugs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from certonnx.errors import DataError, ModelLoadError, ParityError


class OrtRunner:
    """Runs the original ONNX file on batches of raw inputs ``(N, *sample_shape)``.

    ``mean``/``std`` (user-declared normalization, not inside the file) are applied before the
    file is run, because the file itself expects normalized inputs; per channel of input axis
    ``axis`` (1 when None; the last one of a channels-last input).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        axis: int | None = None,
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
        self.axis = 1 if axis is None else int(axis)

    @classmethod
    def for_model(cls, path: str | os.PathLike[str], model: object) -> OrtRunner:
        """A runner for ``path`` that applies ``model``'s user-declared normalization (one that is
        not inside the file, i.e. prepended by ``--mean/--std``) the way the torch model does."""
        norm = getattr(model, "normalization", None)
        if norm is not None and not norm.inside:
            return cls(path, norm.mean, norm.std, axis=norm.axis)
        return cls(path)

    @property
    def sample_dims(self) -> tuple[int, ...] | None:
        """The file's per-sample input shape, or None when some axis besides the batch is symbolic."""
        dims = [d if isinstance(d, int) and d > 0 else None for d in self.input_dims[1:]]
        return None if any(d is None for d in dims) else tuple(dims)  # type: ignore[arg-type]

    def _prep(self, x: np.ndarray) -> np.ndarray:
        """float32 in the file's input shape, normalized per channel (axis 1 of that shape, or
        the axis :func:`~certonnx.io.normalization.prepend_normalization` chose for a
        channels-last input, as it does in the torch model)."""
        x = np.asarray(x, dtype=np.float32)
        dims = self.sample_dims
        if dims is not None and tuple(x.shape[1:]) != dims:
            from certonnx.layout import is_reshape_view

            if not is_reshape_view(x.shape[1:], dims):
                # a reshape here would silently reorder values (e.g. NHWC pixels into NCHW)
                raise DataError(f"inputs of shape {list(x.shape[1:])} do not fit onnxruntime's input "
                                f"{self.input_name!r} of shape {list(dims)} without reordering values")
            x = x.reshape(x.shape[0], *dims)  # flat rows (VNN-LIB) or unit axes: same element order
        if self.mean is not None and self.std is not None:
            shape = [1] * x.ndim
            shape[min(self.axis, x.ndim - 1)] = -1
            x = (x - self.mean.reshape(shape)) / self.std.reshape(shape)
        return x.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``(N, K)`` (flattened per sample)."""
        x = self._prep(x)
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


#: samples compared by the clean-prediction guard: one onnxruntime batch
GUARD_SAMPLES = 256
#: a differing argmax is excused only where onnxruntime's top-2 gap is below this fraction of
#: the sample's largest |logit| (a near-tie that float rounding in either engine can flip)
NEAR_TIE_REL = 1e-4


def guard_indices(n: int, k: int = GUARD_SAMPLES) -> np.ndarray:
    """Up to ``k`` sample indices spread evenly over ``n`` (all of them when ``n <= k``)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def near_ties(out: np.ndarray, rel: float = NEAR_TIE_REL) -> np.ndarray:
    """Per sample: the two largest outputs are within ``rel`` of the largest magnitude."""
    out = np.asarray(out, dtype=np.float64)
    if out.shape[1] < 2:
        return np.ones(out.shape[0], dtype=bool)
    top2 = np.sort(out, axis=1)[:, -2:]
    scale = np.maximum(np.abs(out).max(1), 1e-30)
    return (top2[:, 1] - top2[:, 0]) < rel * scale


def check_clean_predictions(
    runner: OrtRunner,
    x_user: np.ndarray,
    torch_logits: np.ndarray,
    *,
    source: str = "the ONNX file",
    indices: np.ndarray | None = None,
) -> dict[str, int]:
    """The standing guard: onnxruntime on the original file, fed the data as the user stores
    it (``x_user``, made to fit the file's input only by :mod:`certonnx.layout`'s rules: as
    is, a channel transpose or a pure re-view), must predict the class that certonnx's torch
    model predicts on its own prepared inputs (``torch_logits``, same samples, same order).

    Raises :class:`ParityError` (one line) when some argmax differs and onnxruntime's top-2 gap
    does not make it a near-tie; returns ``{"samples", "agree", "near_ties"}`` otherwise.
    ``indices`` (into the original numbering) only make the message name the right sample.
    """
    from certonnx.layout import apply_layout, plan_layout

    xa = np.asarray(x_user, dtype=np.float32)
    if xa.shape[0] == 0:
        return {"samples": 0, "agree": 0, "near_ties": 0}
    t = np.asarray(torch_logits, dtype=np.float64).reshape(xa.shape[0], -1)
    dims = runner.sample_dims
    if dims is not None:
        plan = plan_layout(xa.shape[1:], dims)
        if plan is None:
            raise DataError(f"data samples have shape {list(xa.shape[1:])} but onnxruntime's input "
                            f"{runner.input_name!r} is {list(dims)}: cannot check certonnx's predictions against it")
        xa = apply_layout(xa, plan[0])
    o = runner(xa)
    if o.shape[1] != t.shape[1]:
        raise ParityError(f"onnxruntime on {source} gives {o.shape[1]} outputs per sample but certonnx's model "
                          f"gives {t.shape[1]}; no result is reported")
    p_ort, p_torch = o.argmax(1), t.argmax(1)
    fin_o, fin_t = np.isfinite(o).all(1), np.isfinite(t).all(1)
    # NaN/inf scores have no meaningful argmax: excused when both engines give them, a
    # disagreement when only one does
    differ = np.where(fin_o & fin_t, p_ort != p_torch, fin_o != fin_t)
    tie = near_ties(np.where(np.isfinite(o), o, 0.0)) & fin_o & fin_t
    bad = np.nonzero(differ & ~tie)[0]
    if bad.size:
        i = int(bad[0])
        where = int(indices[i]) if indices is not None else i
        raise ParityError(
            f"onnxruntime on {source} predicts another class than certonnx's imported model on {bad.size} of "
            f"{xa.shape[0]} checked samples (first: sample {where}, onnxruntime class {int(p_ort[i])}, certonnx "
            f"class {int(p_torch[i])}): the data or --mean/--std reach the model differently from how onnxruntime "
            "receives them, or the import is wrong; no result is reported"
        )
    return {"samples": int(xa.shape[0]), "agree": int((~differ).sum()), "near_ties": int((differ & tie).sum())}


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
