"""Adversarial attacks (PGD) used to falsify samples and VNN-LIB properties."""

from certonnx.attacks.pgd import attack_loss, pgd_attack, property_tensors

__all__ = ["attack_loss", "pgd_attack", "property_tensors"]
