"""Load an ONNX file as a trainable, batch-dynamic torch.fx graph, checked against onnxruntime.

Pipeline: read (never modify) the file -> parse + checker -> external data -> import passes
(:mod:`certonnx.io.passes`) -> a final softmax set aside (:mod:`certonnx.io.head`) ->
normalization detection -> ``onnx2torch.convert`` -> float
initializers become ``nn.Parameter``s -> parity gate (torch vs onnxruntime on random inputs in
the domain, batch 1 and 2). Every failure is a :class:`ModelLoadError` / :class:`ParityError` /
:class:`UnsupportedOpError` with one clear line.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from certonnx.errors import ModelLoadError, ParityError, UnsupportedOpError
from certonnx.graph.model import CertModel
from certonnx.io import passes as P
from certonnx.io.normalization import detect_normalization

ATOL = 1e-4
RTOL = 1e-3


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception message on one line (onnx and onnxruntime messages span several)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse ``path`` (and its external data) without touching the file; ModelLoadError on
    anything that is not a valid ONNX model."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelLoadError(f"not a file: {p}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"cannot read {p}: {e.strerror or e}") from e
    if not data:
        raise ModelLoadError(f"{p} is empty, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning, ...
        raise ModelLoadError(f"{p} is not an ONNX model (protobuf parse error: {one_line(e)})") from e
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelLoadError(f"{p} is not an ONNX model (no graph); is the file truncated or of another format?")
    bad = _non_utf8_field(model)
    if bad is not None:
        raise ModelLoadError(f"{p} is not a valid ONNX model: {bad} is not UTF-8 text; is the file corrupt?")
    _load_external_data(model, p)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - onnx.checker.ValidationError and friends
        raise ModelLoadError(f"{p} fails the ONNX checker: {one_line(e)}") from e
    return model


def _non_utf8_field(model: onnx.ModelProto) -> str | None:
    """Where a string field holds bytes that are not UTF-8, or None.

    protobuf parses such a field without complaint and hands back ``bytes`` instead of ``str``
    (one flipped byte in ``producer_version`` is enough); every later ``" ".join`` or f-string
    would then fail far from the cause. Walks the messages only: tensor data are ``bytes`` fields
    and are skipped.
    """
    from google.protobuf.descriptor import FieldDescriptor as FD

    def repeated(fd: Any) -> bool:
        r = getattr(fd, "is_repeated", None)
        return bool(r) if r is not None else fd.label == FD.LABEL_REPEATED

    stack: list[tuple[Any, str]] = [(model, "model")]
    while stack:
        msg, where = stack.pop()
        for fd, value in msg.ListFields():
            if fd.type == FD.TYPE_STRING:
                for v in (value if repeated(fd) else (value,)):
                    if not isinstance(v, str):
                        return f"{where}.{fd.name}"
            elif fd.type == FD.TYPE_MESSAGE:
                if repeated(fd):
                    stack.extend((sub, f"{where}.{fd.name}[{k}]") for k, sub in enumerate(value))
                else:
                    stack.append((value, f"{where}.{fd.name}"))
    return None


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Resolve external tensors relative to the model's folder; name any missing file."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = path.parent
    missing: list[str] = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            f = (base / loc).resolve()
            if not loc or not f.is_file():
                missing.append(loc or f"<no location for {t.name}>")
    if missing:
        uniq = sorted(set(missing))
        raise ModelLoadError(
            f"external data file{'s' if len(uniq) > 1 else ''} missing for {path.name}: {', '.join(uniq)} "
            f"(expected next to the model in {base})"
        )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as e:  # noqa: BLE001 - short reads, bad offsets
        raise ModelLoadError(f"cannot read the external data of {path.name}: {one_line(e)}") from e


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
def _find_unconvertible(model: onnx.ModelProto) -> UnsupportedOpError | None:
    """Run onnx2torch's per-node converters one at a time to name the node that fails."""
    from certonnx.io.onnx2torch_import import import_onnx2torch

    import_onnx2torch()
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    opsets = {o.domain: o.version for o in model.opset_import}
    try:
        graph = OnnxGraph(model.graph)
    except Exception:  # noqa: BLE001
        return None
    for name, node in graph.nodes.items():
        op = node.operation_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.operation_type}"
        version = opsets.get(node.domain, opsets.get("", 0))
        try:
            conv = get_converter(domain=node.domain, operation_type=node.operation_type, version=version)
        except NotImplementedError:
            return UnsupportedOpError(op, name, f"no converter to torch for opset {version}")
        try:
            conv(node, graph)
        except Exception as e:  # noqa: BLE001
            return UnsupportedOpError(op, name, one_line(e))
    return None


def convert(model: onnx.ModelProto) -> fx.GraphModule:
    """``onnx2torch.convert`` with errors mapped to UnsupportedOpError naming the node."""
    from certonnx.io import converters  # registers the contrib GELU converters
    from certonnx.io.onnx2torch_import import import_onnx2torch

    onnx2torch = import_onnx2torch()

    model = converters.for_onnx2torch(model)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = onnx2torch.convert(model, attach_onnx_mapping=True)
    except Exception as e:  # noqa: BLE001 - NotImplementedError, KeyError, ValueError, ...
        err = _find_unconvertible(model)
        if err is not None:
            raise err from e
        raise ModelLoadError(f"cannot convert the graph to torch: {type(e).__name__}: {one_line(e)}") from e
    return gm


def onnx_mapping(gm: fx.GraphModule) -> dict[str, Any]:
    """``{fx node name: OnnxMapping(inputs, outputs)}`` for converted nodes."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            mp = getattr(mod, "onnx_mapping", None)
            if mp is not None:
                out[node.name] = mp
    return out


def annotate(gm: fx.GraphModule, model: onnx.ModelProto) -> None:
    """Record on each fx node which ONNX node it came from (``node.meta["onnx_op_type"]``,
    ``node.meta["onnx_node"]``) so reports can speak in ONNX terms."""
    producer = P._producers(model)
    mapping = onnx_mapping(gm)
    for node in gm.graph.nodes:
        mp = mapping.get(node.name)
        if mp is None or not mp.outputs:
            continue
        src = producer.get(mp.outputs[0])
        if src is not None:
            node.meta["onnx_op_type"] = src.op_type if src.domain in ("", "ai.onnx") else f"{src.domain}:{src.op_type}"
            node.meta["onnx_node"] = src.name or mp.outputs[0]


def make_trainable(gm: fx.GraphModule, frozen: set[str]) -> list[str]:
    """Turn float initializer buffers (except ``frozen`` ONNX names and scalars) into
    ``nn.Parameter``s. onnx2torch stores initializers that are not Conv/Gemm/BatchNorm weights
    (MatMul weights, Add biases) as buffers; certified training must update them too.

    Returns the ONNX initializer names that became parameters.
    """
    inits = getattr(gm, "initializers", None)
    if inits is None:
        return []
    # buffer name -> ONNX initializer name, via the consumers' onnx_mapping
    onnx_name: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mp = getattr(gm.get_submodule(node.target), "onnx_mapping", None)
        if mp is None:
            continue
        for k, a in enumerate(node.args):
            if isinstance(a, fx.Node) and a.op == "get_attr" and k < len(mp.inputs):
                onnx_name.setdefault(str(a.target).split(".")[-1], mp.inputs[k])
    made = []
    for bname, buf in list(inits.named_buffers(recurse=False)):
        if not torch.is_floating_point(buf) or buf.numel() <= 1:
            continue
        if onnx_name.get(bname) in frozen:
            continue
        del inits._buffers[bname]
        inits.register_parameter(bname, nn.Parameter(buf.detach().clone()))
        made.append(onnx_name.get(bname, bname))
    return made


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    """Runs the graph and records every converted node's output under its ONNX output names."""

    def __init__(self, gm: fx.GraphModule, mapping: dict[str, Any]) -> None:
        super().__init__(gm)
        self.mapping = mapping
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        mp = self.mapping.get(n.name)
        if mp is not None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for name, v in zip(mp.outputs, outs):
                if isinstance(v, torch.Tensor):
                    self.values[name] = v.detach()
        return out


def _close(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in a broken graph: simply "not close"
        return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def diverging_node(
    model: onnx.ModelProto, gm: fx.GraphModule, x: np.ndarray, atol: float = ATOL, rtol: float = RTOL
) -> tuple[str, str, float] | None:
    """First ONNX node (graph order) whose torch output differs from onnxruntime's:
    ``(node name, op type, max abs diff)``; None when every intermediate agrees."""
    m = copy.deepcopy(model)
    types = {v.name: v.type.tensor_type.elem_type for v in P.infer_shapes(m).graph.value_info}
    have = {o.name for o in m.graph.output}
    names = []
    for n in m.graph.node:
        for o in n.output:
            if o and types.get(o) in P.FLOAT_TYPES:
                names.append(o)
                if o not in have:
                    m.graph.output.append(onnx.helper.make_tensor_value_info(o, types[o], None))
    try:
        sess = P.ort_session(m.SerializeToString())
        ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    except Exception:  # noqa: BLE001 - diagnosis is best effort
        return None
    rec = _Recorder(gm, onnx_mapping(gm))
    with torch.no_grad():
        try:
            dev = next((t.device for t in gm.parameters()), torch.device("cpu"))
            rec.run(torch.from_numpy(x).to(dev))
        except Exception:  # noqa: BLE001
            return None
    producer = P._producers(m)
    for name in names:
        if name in ref and name in rec.values:
            t = rec.values[name].cpu().numpy()
            r = np.asarray(ref[name])
            if t.shape != r.shape or not _close(t, r, atol, rtol):
                node = producer[name]
                with np.errstate(invalid="ignore", over="ignore"):
                    diff = float(np.max(np.abs(t - r))) if t.shape == r.shape else float("inf")
                return (node.name or name, node.op_type, diff)
    return None


def parity(
    model: onnx.ModelProto, gm: nn.Module, sample_shape: tuple[int, ...], domain: tuple[float, float],
    *, n: int = 8, seed: int = 0, atol: float = ATOL, rtol: float = RTOL, batches: tuple[int, ...] = (2, 1),
    extra_inputs: list[np.ndarray] | None = None, what: str = "imported torch graph",
) -> float:
    """Max abs difference torch vs onnxruntime over ``n`` random inputs (in batches of
    ``batches``); raises ParityError naming the first diverging node when out of tolerance."""
    try:
        sess = P.ort_session(model.SerializeToString())
    except Exception as e:  # noqa: BLE001 - onnxruntime's Fail / NotImplemented / InvalidGraph
        raise ModelLoadError(f"onnxruntime cannot load the {what.replace('imported torch graph', 'model')}: "
                             f"{one_line(e)}") from e
    iname = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    lo, hi = domain
    xs: list[np.ndarray] = []
    left = max(n, 1)
    k = 0
    while left > 0:
        b = min(batches[k % len(batches)], left)
        xs.append((lo + (hi - lo) * rng.random((b, *sample_shape))).astype(np.float32))
        left -= b
        k += 1
    xs.extend(np.asarray(e, dtype=np.float32) for e in (extra_inputs or []))
    worst = 0.0
    gm.eval()
    dev = next((t.device for t in gm.parameters()), None) or next((t.device for t in gm.buffers()), torch.device("cpu"))
    for x in xs:
        try:
            ref = np.asarray(sess.run(None, {iname: x})[0])
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(
                f"onnxruntime cannot run the model with batch {x.shape[0]}: {one_line(e)}"
            ) from e
        try:
            with torch.no_grad():
                out = gm(torch.from_numpy(x).to(dev)).detach().cpu().numpy()
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(
                f"the {what} fails on a batch of {x.shape[0]}: {type(e).__name__}: {one_line(e)}"
            ) from e
        if out.shape != ref.shape:
            raise ParityError(f"{what}: output shape {tuple(out.shape)} but onnxruntime gives {tuple(ref.shape)} "
                              f"for batch {x.shape[0]}")
        if ref.dtype.kind == "f" and not np.all(np.isfinite(ref)):
            # nothing to certify, and NaN would only show up as "differs by nan" below
            raise ModelLoadError(f"onnxruntime computes NaN or infinite outputs for random inputs in "
                                 f"[{lo:g}, {hi:g}] (batch {x.shape[0]}); are the weights corrupt?")
        diff = float(np.max(np.abs(out - ref))) if out.size else 0.0
        worst = max(worst, diff)
        if not _close(out, ref, atol, rtol) or not np.all(np.isfinite(out)) and np.all(np.isfinite(ref)):
            where = ""
            if isinstance(gm, fx.GraphModule):
                d = diverging_node(model, gm, x, atol, rtol)
                if d is not None:
                    where = f"; first diverging node {d[0]!r} ({d[1]}, max abs diff {d[2]:.3g})"
            raise ParityError(
                f"{what} differs from onnxruntime by {diff:.3g} (atol {atol:g}, rtol {rtol:g}) "
                f"on a batch of {x.shape[0]}{where}"
            )
    return worst


# --------------------------------------------------------------------------------------------
def _dims(vi: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
    )


def load(
    path: str | os.PathLike[str],
    *,
    check_parity: bool = True,
    n_parity: int = 8,
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    strip_head: bool = True,
) -> CertModel:
    """Import ``path`` as a :class:`CertModel` (see module docstring). The file is only read.

    ``strip_head``: a final Softmax/LogSoftmax over the class axis is cut off
    (:func:`certonnx.io.head.strip_head`): the module returns the logits before it, the model's
    ``head`` records it, and export writes it back. ``False`` keeps it in the graph, for callers
    whose properties speak of the file's output values themselves (VNN-LIB).
    """
    src = read_model(path)
    ops = P.op_counts(src)
    opset = P.main_opset(src)
    producer = " ".join(s for s in (src.producer_name, src.producer_version) if s)
    metadata = {p.key: p.value for p in src.metadata_props}

    model, notes = P.run_passes(src)
    inp = P.check_single_float_input(model)
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        # the parity gate, the bounds and training all run in float32; feeding float32 to a
        # float16/double graph would only fail later with an onnxruntime type error
        tname = P.type_name(inp.type.tensor_type.elem_type)
        raise ModelLoadError(f"input {inp.name!r} has type {tname}; certonnx needs a float32 (FLOAT) input")
    sample_shape = _dims(inp)[1:]
    if any(d is None for d in sample_shape):
        raise ModelLoadError(
            f"input {inp.name!r} has shape {list(_dims(inp))}: only the batch (first) dimension may be symbolic"
        )
    sample = tuple(int(d) for d in sample_shape)  # type: ignore[arg-type]
    head = None
    if strip_head:
        from certonnx.io.head import strip_head as _strip_head

        model, head = _strip_head(model, sample)
        if head is not None:
            notes.append(f"final {head.op} set aside: certified on the logits before it, kept on export")
    found = detect_normalization(model)

    gm = convert(model)
    annotate(gm, model)
    gm.meta["certonnx_import_notes"] = notes
    make_trainable(gm, set(found.constants) if found else set())
    gm.eval()

    with torch.no_grad():
        try:
            y = gm(torch.zeros((2, *sample)))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(
                f"the converted model does not run on a batch of 2: {type(e).__name__}: {one_line(e)}"
            ) from e
    if not isinstance(y, torch.Tensor):
        raise ModelLoadError("the converted model does not return a single tensor")
    if y.dim() == 0 or y.shape[0] != 2:
        # e.g. a Reshape to [-1, k] that folds features into the first dimension: outputs no longer
        # belong to samples, so nothing per sample can be certified
        raise ModelLoadError(f"the model maps a batch of 2 inputs to an output of shape {list(y.shape)}: its first "
                             "dimension must stay the batch (does a Reshape mix samples?)")
    if not torch.is_floating_point(y):
        # e.g. an ArgMax label: there are no scores (margins) to bound
        raise ModelLoadError(f"the model's output {model.graph.output[0].name!r} has type {y.dtype} "
                             "(labels?); certonnx needs float scores such as logits")
    out_shape: tuple[int | None, ...] = (None, *(int(d) for d in y.shape[1:]))

    diff: float | None = None
    if check_parity:
        diff = parity(model, gm, sample, domain, n=n_parity, seed=seed)
    return CertModel(
        module=gm,
        input_name=inp.name,
        output_name=head.output_name if head is not None else model.graph.output[0].name,
        input_shape=(None, *sample),
        output_shape=out_shape,
        opset=opset,
        producer=producer,
        source_path=str(path),
        domain=(float(domain[0]), float(domain[1])),
        normalization=found.normalization if found else None,
        onnx_ops=ops,
        parity_max_abs_diff=diff,
        metadata=metadata,
        head=head,
    )


def load_initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Small helper for tests: an initializer by name as a numpy array."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)
