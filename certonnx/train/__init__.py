"""Certified training and fine-tuning (``certonnx finetune``); see docs/finetune.md."""

from certonnx.train.loop import TrainConfig, Trainer, TrainingError, eps_fraction, lr_at, smooth_ramp, train
from certonnx.train.methods import REGISTRY as METHODS
from certonnx.train.methods import get_method

__all__ = ["METHODS", "TrainConfig", "Trainer", "TrainingError", "eps_fraction", "get_method", "lr_at",
           "smooth_ramp", "train"]
