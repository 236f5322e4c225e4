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

    def describe(self) -> str:
        where = "inside the model" if self.inside else "declared with --mean/--std"
        return f"(x - {self.mean}) / {self.std} ({where})"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "inside": self.inside}


@dataclass
class CertModel:
    """An imported model.

    ``module`` maps a batch of inputs in the model's own input space (batch first, shape
    ``(B, *input_shape[1:])``) to outputs ``(B, *output_shape[1:])``. Its ONNX initializers are
    trainable ``nn.Parameter``s. ``domain`` is the valid range of raw inputs (pixels in [0, 1] by
    default); ε is always measured in that space.
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
