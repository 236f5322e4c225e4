"""A final Softmax / LogSoftmax head (the Keras and scikit-learn default): cut it at import,
write it back at export.

A softmax over the class axis is strictly increasing in each logit's rank, so the predicted
class of the file is the argmax of the logits before it. Bounds of a softmax are useless
(every probability lies in [0, 1] whatever the input) and cross-entropy training wants logits,
so certonnx works on the logits and keeps the head aside (:class:`~certonnx.graph.model.Head`).
The one place where the head still matters, float32 rounding that can make two probabilities
equal, is handled by :mod:`certonnx.certify.head`.

Accepted: the graph output is ``Softmax`` or ``LogSoftmax``, followed only by ``Identity``,
``Flatten`` or ``Reshape`` (constant shape) nodes, over the class axis: the logits have exactly
one non-batch axis longer than 1 and the softmax normalizes over it (for opset < 13, whose
softmax flattens the axes from ``axis`` on, that axis must be among them). The nodes after it
only re-view the values: they must keep the batch as the first axis and the class order,
checked with onnxruntime at two batch sizes, which also confirms that the file's output is the
softmax of the logits. Anything else is left in the graph (and reported unsupported by the
bound rules, as before).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper

from certonnx.graph.model import Head
from certonnx.io import passes as P

HEAD_OPS = ("Softmax", "LogSoftmax")
#: ops allowed after the softmax: they only re-view the values (row-major order is kept)
VIEW_OPS = ("Identity", "Flatten", "Reshape")


def _axis(node: onnx.NodeProto, opset: int) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 1 if opset < 13 else -1


def _softmax(z: np.ndarray, log: bool) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    ls = z - np.log(np.exp(z).sum(1, keepdims=True))
    return ls if log else np.exp(ls)


def strip_head(model: onnx.ModelProto, sample_shape: tuple[int, ...]) -> tuple[onnx.ModelProto, Head | None]:
    """``(model ending at the logits, Head)``, or ``(model, None)`` when the graph does not end
    in a softmax head of the accepted form (module docstring). ``model`` has passed
    :func:`certonnx.io.passes.run_passes` (one float output, batch dynamic)."""
    if len(model.graph.output) != 1:
        return model, None
    out = model.graph.output[0].name
    producer = P._producers(model)
    consumers = P._consumers(model)
    inputs = {i.name for i in P.real_inputs(model)}
    inits = {t.name: t for t in model.graph.initializer}
    chain: list[onnx.NodeProto] = []
    cur = out
    while True:
        node = producer.get(cur)
        if node is None or node.domain not in ("", "ai.onnx"):
            return model, None
        # every value after the logits feeds only the next node of the chain
        if cur != out and len(consumers.get(cur, [])) != 1:
            return model, None
        chain.append(node)
        if node.op_type in HEAD_OPS:
            break
        if node.op_type not in VIEW_OPS or not node.input:
            return model, None
        if node.op_type == "Reshape" and (len(node.input) < 2 or node.input[1] not in inits):
            return model, None
        cur = node.input[0]
    chain.reverse()
    soft = chain[0]
    logits = soft.input[0]
    if logits in inputs or logits in inits or len(soft.input) != 1:
        return model, None
    inp = P.check_single_float_input(model)
    values = P._evaluate(model, inp, [logits, out], sample_shape, batches=(2, 3))
    if values is None:
        return model, None
    opset = P.main_opset(model)
    lshape: tuple[int, ...] | None = None
    oshape: tuple[int, ...] | None = None
    for b, v in zip((2, 3), values):
        z, p = v[logits], v[out]
        if z.ndim < 2 or z.shape[0] != b or p.ndim < 1 or p.shape[0] != b or z.size != p.size:
            return model, None
        if z.dtype.kind != "f" or not np.all(np.isfinite(z)):
            return model, None
        lshape, oshape = tuple(int(d) for d in z.shape[1:]), tuple(int(d) for d in p.shape[1:])
        # the file's output must be the softmax of the logits, sample by sample, in class order
        ref = _softmax(z.reshape(b, -1).astype(np.float64), soft.op_type == "LogSoftmax")
        if not np.allclose(p.reshape(b, -1).astype(np.float64), ref, rtol=1e-4, atol=1e-5):
            return model, None
    assert lshape is not None and oshape is not None
    rank = len(lshape) + 1
    classes = [k for k, d in enumerate(lshape, 1) if d > 1]
    if len(classes) != 1:
        return model, None  # one class, or classes over several axes: not a single class axis
    c = classes[0]
    a = _axis(soft, opset)
    a = a + rank if a < 0 else a
    normalized = range(a, rank) if opset < 13 else range(a, a + 1)
    if a < 1 or c not in normalized:
        return model, None
    m = copy.deepcopy(model)
    elem = values[0][logits].dtype
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(
        logits, helper.np_dtype_to_tensor_dtype(elem), [P.BATCH_DIM, *lshape]))
    m = P.remove_dead_nodes(m)
    used = {i for n in chain for i in n.input[1:] if i}
    head = Head(op=soft.op_type, axis=c, logits_shape=lshape, output_shape=oshape, logits_name=logits,
                output_name=out, opset=opset, nodes=[copy.deepcopy(n) for n in chain],
                initializers=[copy.deepcopy(inits[i]) for i in sorted(used)])
    return m, head


def append_head(onx: onnx.ModelProto, head: Head) -> onnx.ModelProto:
    """``onx`` (an exported model whose one output is the logits) with ``head`` appended: the
    output is the file's again, under its own name. Internal value and node names that the
    exported graph already uses are prefixed; the softmax keeps its attributes except where
    the exported opset reads ``axis`` differently from the file's (opset 13 changed it), then
    it gets the class axis (``1`` below opset 13, which normalizes over all axes from ``axis``)."""
    m = copy.deepcopy(onx)
    g = m.graph
    opset = P.main_opset(m)
    taken = {v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer)}
    taken |= {o for n in g.node for o in (*n.input, *n.output)}
    node_names = {n.name for n in g.node}

    def fresh(name: str, pool: set[str]) -> str:
        new, k = name, 0
        while new in pool:
            k += 1
            new = f"certonnx_head{k}_{name}"
        pool.add(new)
        return new

    logits = g.output[0].name
    if head.output_name in taken:
        raise ValueError(f"the exported graph already has a value named {head.output_name!r}")
    taken.add(head.output_name)
    rename = {head.logits_name: logits}
    for t in head.initializers:
        t2 = copy.deepcopy(t)
        t2.name = fresh(t.name, taken)
        rename[t.name] = t2.name
        g.initializer.append(t2)
    last = len(head.nodes) - 1
    for k, n in enumerate(head.nodes):
        n2 = copy.deepcopy(n)
        for j, i in enumerate(n2.input):
            if i:
                n2.input[j] = rename.get(i, i)
        for j, o in enumerate(n2.output):
            if o:
                new = head.output_name if (k == last and j == 0) else fresh(o, taken)
                rename[o] = new
                n2.output[j] = new
        if n2.name:
            n2.name = fresh(n2.name, node_names)
        if k == 0 and (head.opset < 13) != (opset < 13):
            for a in list(n2.attribute):
                if a.name == "axis":
                    n2.attribute.remove(a)
            n2.attribute.append(helper.make_attribute("axis", head.axis if opset >= 13 else 1))
        g.node.append(n2)
    elem = g.output[0].type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(head.output_name, elem, [P.BATCH_DIM, *head.output_shape]))
    return m


__all__ = ["HEAD_OPS", "VIEW_OPS", "append_head", "strip_head"]
