"""The in-memory model certonnx works on: a torch.fx graph plus what we know about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Normalization:
    """An affine input normalization ``(x - mean) / std`` (per channel or scalar).

    ``inside`` says whether it was found inside the ONNX graph (the model takes pixels) or was
    declared by the user with ``--mean/--std`` (the model takes normalized input and certonnx
    prepends the normalization so that ε stays in pixel space).
    """

    mean: list[float]
    std: list[float]
    inside: bool = True
    #: the input axis the per-channel constants run along when it is not axis 1 (a channels-last
    #: model: ``(N, H, W, C)`` normalized before or after its Transpose to ``(N, C, H, W)``)
    axis: int | None = None

    def describe(self) -> str:
        where = "inside the model" if self.inside else "declared with --mean/--std"
        along = f" per channel of input axis {self.axis}" if self.axis is not None else ""
        return f"(x - {self.mean}) / {self.std}{along} ({where})"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "inside": self.inside,
                **({"axis": self.axis} if self.axis is not None else {})}


@dataclass
class Head:
    """A final ``Softmax``/``LogSoftmax`` that the import removed, so that certonnx bounds,
    certifies and trains the logits before it (a softmax has no useful bounds, and cross-entropy
    wants logits); :func:`certonnx.io.export.export` writes it back.

    Over the class axis it is strictly increasing in each logit's rank, so the argmax is the
    logits' argmax, except where float32 rounding in the head makes two probabilities equal:
    certification then asks for a logit margin above :func:`certonnx.certify.head.margin_threshold`.
    ``nodes`` are the ONNX nodes from the softmax to the graph output (the softmax, then
    ``Identity``/``Flatten``/``Reshape`` that keep the class order and the batch axis),
    ``initializers`` their constant inputs (``Reshape`` shapes), ``opset`` the file's.
    """

    op: str  # "Softmax" or "LogSoftmax"
    axis: int  # the class axis of the logits (the module's output), >= 1
    logits_shape: tuple[int, ...]  # per sample
    output_shape: tuple[int, ...]  # per sample, of the file's output
    logits_name: str = "logits"
    output_name: str = "output"
    opset: int = 17
    nodes: list[Any] = field(default_factory=list, repr=False)  # onnx.NodeProto
    initializers: list[Any] = field(default_factory=list, repr=False)  # onnx.TensorProto

    def describe(self) -> str:
        return f"{self.op} (certified on the logits before it)"

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The head in torch: what the file outputs for these logits (``(B, *output_shape)``)."""
        fn = torch.log_softmax if self.op == "LogSoftmax" else torch.softmax
        return fn(logits, dim=self.axis).reshape(logits.shape[0], *self.output_shape)


@dataclass
class CertModel:
    """An imported model.

    ``module`` maps a batch of inputs in the model's own input space (batch first, shape
    ``(B, *input_shape[1:])``) to outputs ``(B, *output_shape[1:])``. Its ONNX initializers are
    trainable ``nn.Parameter``s. ``domain`` is the valid range of raw inputs (pixels in [0, 1] by
    default); ε is always measured in that space. When the file ends in a softmax (``head``),
    ``module`` returns the logits before it and ``output_name`` is still the file's output.
    """

    module: torch.fx.GraphModule
    input_name: str
    output_name: str
    input_shape: tuple[int | None, ...]  # batch dimension is None
    output_shape: tuple[int | None, ...]
    opset: int = 17
    producer: str = ""
    source_path: str | None = None
    domain: tuple[float, float] = (0.0, 1.0)
    normalization: Normalization | None = None
    onnx_ops: dict[str, int] = field(default_factory=dict)  # op_type -> count in the source graph
    parity_max_abs_diff: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # metadata_props of the source file
    #: a final Softmax/LogSoftmax removed at import: ``module`` returns the logits before it
    head: Head | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Input shape without the batch dimension."""
        return tuple(int(d) for d in self.input_shape[1:])  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int:
        shp = [int(d) for d in self.output_shape[1:] if d is not None]
        n = 1
        for d in shp:
            n *= d
        return n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def input_space(self) -> dict[str, Any]:
        """What ε is measured in, for every report."""
        desc = f"raw inputs in [{self.domain[0]:g}, {self.domain[1]:g}]"
        return {
            "domain": list(self.domain),
            "normalization": self.normalization.to_dict() if self.normalization else None,
            "description": desc
            + (f"; model normalizes {self.normalization.describe()}" if self.normalization else ""),
        }
