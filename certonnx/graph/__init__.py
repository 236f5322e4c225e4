"""torch.fx graph representation and passes."""

from certonnx.graph.model import CertModel, Normalization

__all__ = ["CertModel", "Normalization"]
