"""Training: one loop (Trainer) with hook points, LR plans, optimizers and checkpoints."""

from prunekit.train.config import TrainConfig
from prunekit.train.hooks import Hook
from prunekit.train.lr_plans import LR_PLANS, LRPlan, build_lr_plan
from prunekit.train.trainer import EpochMetrics, Trainer, TrainResult

__all__ = ["LR_PLANS", "EpochMetrics", "Hook", "LRPlan", "TrainConfig", "TrainResult", "Trainer", "build_lr_plan"]
