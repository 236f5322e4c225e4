"""Export a :class:`CertModel` to ONNX with its certificate, parity-checked, written atomically.

We use the TorchScript exporter (``dynamo=False``): on onnx2torch graphs it is the most reliable
one (custom modules such as ``OnnxReshape`` carry their own ONNX export) and it writes opset 17
that every runtime reads. The exported bytes are checked with onnxruntime against the torch
module before anything touches the disk, so a certificate is never attached to a file that
computes something else. A softmax head set aside at import (:mod:`certonnx.io.head`) is
written back after the logits: the file ends in the user's ``Softmax``/``LogSoftmax`` again.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from torch import nn

from certonnx._version import __version__
from certonnx.errors import CertonnxError, ExportError, ModelLoadError, ParityError
from certonnx.graph.model import CertModel, Head
from certonnx.io.metadata import (
    KEY_CERTIFICATE,
    KEY_VERSION,
    graph_fingerprint,
    set_metadata,
    weights_fingerprint,
)
from certonnx.utils import atomic_write_bytes, check_writable


def plain_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with torch parametrizations baked into plain weights.

    Not ``parametrize.remove_parametrizations`` on a deep copy: the copy shares the dynamically
    created ``Parametrized*`` class with the original, and removal deletes the property from
    that class, breaking the caller's model. We swap the copy's class back instead.
    """
    from torch.nn.utils import parametrize

    m = copy.deepcopy(module)
    for sub in list(m.modules()):
        if parametrize.is_parametrized(sub):
            with torch.no_grad():
                values = {name: getattr(sub, name).detach().clone() for name in sub.parametrizations}  # type: ignore[union-attr]
            del sub._modules["parametrizations"]
            sub.__class__ = sub.__class__.__bases__[0]
            for name, v in values.items():
                sub.register_parameter(name, nn.Parameter(v))
    return m


class _WithHead(nn.Module):
    """The module followed by the model's softmax head: what the exported file computes."""

    def __init__(self, inner: nn.Module, head: Head) -> None:
        super().__init__()
        self.inner = inner
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.apply(self.inner(x))


def to_onnx_bytes(model: CertModel, opset: int = 17) -> bytes:
    """TorchScript export with a dynamic batch and the source's input/output names."""
    module = plain_module(model.module).cpu().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    x = torch.rand((2, *model.sample_shape))
    lo, hi = model.domain
    x = lo + (hi - lo) * x
    buf = io.BytesIO()
    in_name = model.input_name or "input"
    out_name = model.output_name or "output"
    if model.head is not None:
        # the module's output is the logits; the file's output name goes to the head's last node
        out_name = model.head.logits_name
        if out_name in (model.head.output_name, in_name):
            out_name = model.head.output_name + "_logits"
    if out_name == in_name:
        out_name = out_name + "_out"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (x,),
                cast(Any, buf),  # torch's stubs say path, the exporter also takes a binary file
                dynamo=False,
                opset_version=opset,
                input_names=[in_name],
                output_names=[out_name],
                dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds
        from certonnx.io.load import one_line

        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {one_line(e)}") from e
    onx = onnx.load_model_from_string(buf.getvalue())
    # the exporter may rename values whose names look like its own (VNN-COMP's input "0")
    _rename_value(onx, onx.graph.input[0].name, in_name)
    _rename_value(onx, onx.graph.output[0].name, out_name)
    return onx.SerializeToString()


def _rename_value(onx: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a graph value everywhere (inputs, outputs, node ports, value_info)."""
    if old == new:
        return
    g = onx.graph
    if any(new in n.output for n in g.node) or any(new == i.name for i in g.initializer):
        return  # name taken inside the graph: keep the exporter's
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name == old:
            vi.name = new
    for n in g.node:
        for k, v in enumerate(n.input):
            if v == old:
                n.input[k] = new
        for k, v in enumerate(n.output):
            if v == old:
                n.output[k] = new


def export(
    model: CertModel,
    path: str | os.PathLike[str],
    certificate: dict[str, Any] | None = None,
    *,
    opset: int = 17,
    check_inputs: torch.Tensor | np.ndarray | None = None,
    atol: float = 1e-4,
    n_parity: int = 8,
) -> Path:
    """Write ``model`` to ``path`` as ONNX (see module docstring); returns the path.

    ``certificate`` (from :func:`certonnx.io.metadata.make_certificate`) is stored as JSON in
    ``metadata_props["certonnx.certificate"]`` with ``weights_sha256`` set to the fingerprint of
    the written initializers. ``check_inputs`` (e.g. the evaluated test images) are added to the
    random parity inputs. The module's train/eval mode is restored afterwards.
    """
    from certonnx.io.load import one_line, parity

    out = check_writable(path)
    was_training = model.module.training
    try:
        model.module.eval()
        data = to_onnx_bytes(model, opset=opset)
        onx = onnx.load_model_from_string(data)
        module: nn.Module = model.module
        if model.head is not None:
            # the logits first (a softmax can hide a logit mismatch where it saturates), then
            # the file with the user's head written back against the module followed by it
            try:
                parity(onx, model.module, model.sample_shape, model.domain, n=n_parity, atol=atol, rtol=1e-3,
                       what="exported model")
            except (ParityError, ModelLoadError) as e:
                raise ExportError(f"the exported ONNX does not match the torch model: {e}") from e
            from certonnx.io.head import append_head

            try:
                onx = append_head(onx, model.head)
            except ValueError as e:
                raise ExportError(f"cannot write the model's {model.head.op} back: {e}") from e
            module = _WithHead(model.module, model.head)
        onx.producer_name, onx.producer_version = "certonnx", __version__
        meta = {k: v for k, v in model.metadata.items() if not k.startswith("certonnx.")}
        meta[KEY_VERSION] = __version__
        if certificate is not None:
            cert = dict(certificate)
            cert["weights_sha256"] = weights_fingerprint(onx)
            cert["graph_sha256"] = graph_fingerprint(onx)
            cert.pop("weights_match", None)
            cert.pop("graph_match", None)
            try:
                meta[KEY_CERTIFICATE] = json.dumps(cert, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ExportError(f"the certificate cannot be stored as JSON: {e}") from e
        set_metadata(onx, meta)
        try:
            onnx.checker.check_model(onx)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the exported model fails the ONNX checker: {one_line(e)}") from e
        extra = None
        if check_inputs is not None:
            ci = check_inputs.detach().cpu().numpy() if isinstance(check_inputs, torch.Tensor) else np.asarray(check_inputs)
            extra = [ci[i : i + 256].astype(np.float32) for i in range(0, len(ci), 256)]
        try:
            parity(
                onx, module, model.sample_shape, model.domain, n=n_parity, atol=atol, rtol=1e-3,
                extra_inputs=extra, what="exported model",
            )
        except (ParityError, ModelLoadError) as e:
            raise ExportError(f"the exported ONNX does not match the torch model: {e}") from e
        except CertonnxError:
            raise
        final = onx.SerializeToString()
    finally:
        model.module.train(was_training)
    return atomic_write_bytes(out, final)
