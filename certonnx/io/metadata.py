"""The certificate stored in an exported model's ``metadata_props`` (schema in docs/metadata.md).

The certificate travels with the weights: any ONNX runtime can read it
(``onnxruntime.InferenceSession(p).get_modelmeta().custom_metadata_map["certonnx.certificate"]``),
and ``weights_sha256`` ties it to the exact initializers it was computed for, so a certificate
copied onto other weights is detectable.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from certonnx._version import __version__
from certonnx.errors import ModelLoadError

SCHEMA = "certonnx.certificate/1"
KEY_CERTIFICATE = "certonnx.certificate"
KEY_VERSION = "certonnx.version"


def make_certificate(
    *,
    norms: dict[str, float],
    input_space: dict[str, Any],
    method: str,
    verifier: str,
    dataset_sha256: str | None,
    n: int,
    clean_accuracy: float,
    certified_accuracy: dict[str, float],
    union_certified_accuracy: float | None,
    pgd_accuracy: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a certificate dict (JSON-serialisable). ``weights_sha256`` is left ``None``: export
    fills it with the fingerprint of the weights actually written.

    ``norms`` maps a norm label (``"linf"``, ``"l2"``) to its radius ε in raw input space;
    ``certified_accuracy`` has the same keys; ``union_certified_accuracy`` is the fraction of
    samples certified for every norm at once.
    """
    cert = {
        "schema": SCHEMA,
        "certonnx_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "norms": {str(k): float(v) for k, v in norms.items()},
        "input_space": input_space,
        "method": str(method),
        "verifier": str(verifier),
        "dataset_sha256": dataset_sha256,
        "n": int(n),
        "clean_accuracy": float(clean_accuracy),
        "certified_accuracy": {str(k): float(v) for k, v in certified_accuracy.items()},
        "union_certified_accuracy": None if union_certified_accuracy is None else float(union_certified_accuracy),
        "pgd_accuracy": None if pgd_accuracy is None else {str(k): float(v) for k, v in pgd_accuracy.items()},
        "weights_sha256": None,
        "graph_sha256": None,
        "extra": dict(extra or {}),
    }
    json.dumps(cert)  # fail here, not at export, on values JSON cannot hold
    return cert


def certificate_from_result(result: dict[str, Any], *, verifier: str, dataset_sha256: str | None,
                            method: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A certificate from a ``certify_dataset`` result (the dict behind ``certify --json``), so
    every command stores the same numbers under the same keys. A softmax head the numbers were
    certified behind (``result["head"]``) is recorded in ``extra["head"]``."""
    if result.get("head"):
        extra = {"head": result["head"], **(extra or {})}
    return make_certificate(
        norms=result["epsilon"], input_space=result["input_space"], method=method or result["method"],
        verifier=verifier, dataset_sha256=dataset_sha256, n=result["n"], clean_accuracy=result["clean_accuracy"],
        certified_accuracy=result["certified_accuracy"],
        union_certified_accuracy=result["union_certified_accuracy"], pgd_accuracy=result["pgd_accuracy"],
        extra=extra,
    )


def certificate_from_smoothing(result: dict[str, Any], *, dataset_sha256: str | None,
                               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A certificate from a ``certify --method smoothing`` result: the probabilistic numbers go
    under ``"probabilistic"`` and the deterministic fields stay empty (``norms`` ``{}``,
    ``certified_accuracy`` ``{}``, union ``None``), so no reader of deterministic numbers —
    ``check --require linf:…`` included — can take a probabilistic claim for a proof."""
    s = result["smoothing"]
    cert = make_certificate(
        norms={}, input_space=result["input_space"], method="smoothing",
        verifier=f"certonnx certify (randomized smoothing, votes from {s['votes_from']})",
        dataset_sha256=dataset_sha256, n=result["n"], clean_accuracy=result["clean_accuracy"],
        certified_accuracy={}, union_certified_accuracy=None, pgd_accuracy=None, extra=extra,
    )
    cert["probabilistic"] = {
        "method": "randomized-smoothing", "meaning": s["meaning"],
        "sigma": float(s["sigma"]), "alpha": float(s["alpha"]), "n0": int(s["n0"]), "n_samples": int(s["n"]),
        "norms": {str(k): float(v) for k, v in result["epsilon"].items()},
        "smoothed_accuracy": float(s["accuracy"]),
        "abstained": int(s["abstained"]),
        "certified_accuracy": {str(k): float(v) for k, v in s["certified_accuracy"].items()},
        "union_certified_accuracy": float(s["union_certified_accuracy"]),
        "mean_radius_l2": float(s["mean_radius_l2"]),
    }
    json.dumps(cert)
    return cert


def weights_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 over the initializers sorted by name: name, dtype, shape and values of each."""
    h = hashlib.sha256()
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        arr = np.ascontiguousarray(numpy_helper.to_array(t))
        h.update(t.name.encode())
        h.update(b"\0" + str(arr.dtype).encode() + b"\0" + str(arr.shape).encode() + b"\0")
        h.update(arr.tobytes())
    return h.hexdigest()


def _hash_value(h: Any, v: Any) -> None:
    """Feed one attribute value into ``h`` canonically (tensors by dtype/shape/bytes, subgraphs
    recursively), so the fingerprint depends on content, not on protobuf serialisation details."""
    if isinstance(v, onnx.TensorProto):
        arr = np.ascontiguousarray(numpy_helper.to_array(v))
        h.update(b"T" + str(arr.dtype).encode() + b"\0" + str(arr.shape).encode() + b"\0" + arr.tobytes())
    elif isinstance(v, onnx.GraphProto):
        h.update(b"G")
        _hash_graph(h, v)
    elif isinstance(v, list | tuple):
        h.update(b"L" + str(len(v)).encode() + b"\0")
        for item in v:
            _hash_value(h, item)
    elif isinstance(v, bytes):
        h.update(b"B" + str(len(v)).encode() + b"\0" + v)
    else:
        h.update(b"S" + repr(v).encode() + b"\0")


def _hash_graph(h: Any, g: onnx.GraphProto) -> None:
    for vi in (*g.input, *g.output):
        h.update(b"V" + vi.name.encode() + b"\0" + vi.type.SerializeToString(deterministic=True))
    for node in g.node:
        h.update(b"N" + node.domain.encode() + b"\0" + node.op_type.encode() + b"\0")
        h.update("\0".join(node.input).encode() + b"\1" + "\0".join(node.output).encode() + b"\1")
        for attr in sorted(node.attribute, key=lambda a: a.name):
            h.update(b"A" + attr.name.encode() + b"\0")
            _hash_value(h, onnx.helper.get_attribute_value(attr))


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 over the computation itself: graph inputs/outputs and every node in order (domain,
    op type, input/output names, attributes including constant tensors and subgraphs).

    Complements :func:`weights_fingerprint`: a changed activation, a rewired node or an edited
    ``Constant`` (e.g. the normalization's mean/std) changes the function without touching any
    initializer. Metadata, names of the producer and doc strings do not count.
    """
    h = hashlib.sha256()
    _hash_graph(h, model.graph)
    return h.hexdigest()


def _as_model(path_or_model: str | os.PathLike[str] | onnx.ModelProto | bytes) -> onnx.ModelProto:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    if isinstance(path_or_model, bytes):
        return onnx.load_model_from_string(path_or_model)
    from certonnx.io.load import read_model

    return read_model(Path(path_or_model))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _malformed(cert: dict[str, Any]) -> str | None:
    """What is wrong with the types of a certificate's known keys (None when nothing). The
    metadata is plain text anyone can edit; readers (inspect, check) must not crash on
    ``"norms": "x"``."""
    for key in ("norms", "certified_accuracy", "pgd_accuracy"):
        v = cert.get(key)
        if v is None and key != "norms":
            continue
        if key in cert and not (isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items())):
            return f"{key!r} must be an object of numbers, got {json.dumps(v)[:60]}"
    for key in ("clean_accuracy", "union_certified_accuracy"):
        if cert.get(key) is not None and not _is_number(cert[key]):
            return f"{key!r} must be a number, got {json.dumps(cert[key])[:60]}"
    if "n" in cert and not (isinstance(cert["n"], int) and not isinstance(cert["n"], bool) and cert["n"] >= 0):
        return f"'n' must be a sample count, got {json.dumps(cert['n'])[:60]}"
    for key in ("schema", "weights_sha256", "graph_sha256", "method", "verifier", "created", "dataset_sha256"):
        if cert.get(key) is not None and not isinstance(cert[key], str):
            return f"{key!r} must be a string, got {json.dumps(cert[key])[:60]}"
    for key in ("input_space", "extra", "probabilistic"):
        if cert.get(key) is not None and not isinstance(cert[key], dict):
            return f"{key!r} must be an object, got {json.dumps(cert[key])[:60]}"
    prob = cert.get("probabilistic")
    if prob is not None:
        bad = _malformed({k: prob.get(k) for k in ("norms", "certified_accuracy", "union_certified_accuracy")
                          if k in prob})
        if bad:
            return f"probabilistic: {bad}"
        for key in ("sigma", "alpha", "smoothed_accuracy"):
            if not _is_number(prob.get(key)):
                return f"probabilistic: {key!r} must be a number, got {json.dumps(prob.get(key))[:60]}"
    return None


def read_certificate(path_or_model: str | os.PathLike[str] | onnx.ModelProto | bytes) -> dict[str, Any] | None:
    """The certificate stored in a model, or None when it has none.

    Adds ``weights_match`` (bool): whether ``weights_sha256`` matches the model's initializers, and
    ``graph_match`` (bool, or None for a certificate written before ``graph_sha256`` existed):
    whether ``graph_sha256`` matches its nodes.
    """
    model = _as_model(path_or_model)
    meta = {p.key: p.value for p in model.metadata_props}
    raw = meta.get(KEY_CERTIFICATE)
    if raw is None:
        return None
    try:
        cert = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"the {KEY_CERTIFICATE} metadata is not valid JSON: {e}") from e
    if not isinstance(cert, dict):
        raise ModelLoadError(f"the {KEY_CERTIFICATE} metadata is not a JSON object")
    bad = _malformed(cert)
    if bad:
        raise ModelLoadError(f"the {KEY_CERTIFICATE} metadata is malformed: {bad}")
    fp = cert.get("weights_sha256")
    cert["weights_match"] = bool(fp) and fp == weights_fingerprint(model)
    gfp = cert.get("graph_sha256")
    cert["graph_match"] = None if "graph_sha256" not in cert else (bool(gfp) and gfp == graph_fingerprint(model))
    return cert


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries in place."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in entries.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
