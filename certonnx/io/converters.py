"""onnx2torch converters for the ops certonnx's import passes produce and onnx2torch lacks.

onnx2torch 1.5 has no converter for GELU in any form. The import passes
(:func:`certonnx.io.passes.gelu_to_contrib`, :func:`certonnx.io.passes.fuse_gelu`) rewrite every
GELU they recognise (opset-20 ``Gelu`` and the decomposed patterns exporters write for opsets
< 20) into onnxruntime's contrib ops ``com.microsoft:Gelu`` (erf form) and
``com.microsoft:FastGelu`` (tanh form): opset 17 has no GELU, and onnxruntime runs the contrib
ops, so the parity gate can still compare the imported graph with the rewritten file. Both map
to ``nn.GELU``, which the bound engine bounds as one function
(:mod:`certonnx.bounds.rules.gelu`) and the TorchScript exporter writes back as the standard
decomposition.

onnx2torch names a module after its node's domain, and a module name must not contain a dot,
so :func:`for_onnx2torch` hands onnx2torch a copy with those nodes in the dot-free domain
:data:`TORCH_DOMAIN`, where the converters are registered. Importing this module registers them
(once; a converter onnx2torch itself gained in a later version is left alone).
"""

from __future__ import annotations

import copy

import onnx
from onnx import helper
from torch import nn

#: contrib domain of onnxruntime's GELU kernels, and the opset version the passes import
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_VERSION = 1
#: the same nodes as onnx2torch sees them (its module names may not contain ".")
TORCH_DOMAIN = "certonnx_contrib"
_OPS = {"Gelu": "none", "FastGelu": "tanh"}


def for_onnx2torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its contrib GELU nodes moved to :data:`TORCH_DOMAIN` (a copy; the model
    itself when it has none), and the shapes of every value recorded.

    onnx2torch's converters read shapes from ONNX shape inference (BatchNorm, AveragePool and
    Clip need their input's), which knows no contrib op and so would stop at the first GELU;
    :func:`certonnx.io.passes.infer_shapes` sees through them, and its shapes are recorded as
    ``value_info``."""
    from certonnx.io.passes import infer_shapes

    if not any(n.domain == CONTRIB_DOMAIN and n.op_type in _OPS for n in model.graph.node):
        return model
    m = copy.deepcopy(model)
    known = {v.name for v in m.graph.value_info}
    m.graph.value_info.extend(v for v in infer_shapes(model).graph.value_info if v.name not in known)
    for n in m.graph.node:
        if n.domain == CONTRIB_DOMAIN and n.op_type in _OPS:
            n.domain = TORCH_DOMAIN
    m.opset_import.append(helper.make_opsetid(TORCH_DOMAIN, CONTRIB_VERSION))
    return m


def _register() -> None:
    from certonnx.io.onnx2torch_import import import_onnx2torch

    import_onnx2torch()
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def converter(approximate: str):  # noqa: ANN202 - onnx2torch's converter signature
        def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
            if len([i for i in node.input_values if i]) != 1:
                # FastGelu's optional bias input: the passes never write it
                raise NotImplementedError(f"{node.operation_type} with a bias input")
            return OperationConverterResult(torch_module=nn.GELU(approximate=approximate),
                                            onnx_mapping=onnx_mapping_from_node(node=node))

        return convert

    for op, approximate in _OPS.items():
        desc = OperationDescription(domain=TORCH_DOMAIN, operation_type=op, version=CONTRIB_VERSION)
        if desc not in _CONVERTER_REGISTRY:
            add_converter(operation_type=op, version=CONTRIB_VERSION, domain=TORCH_DOMAIN)(converter(approximate))


_register()
