"""Training in the parallel form: data, the trainer, evaluation."""

from .data import TokenData, WindowSampler, load_data
from .trainer import ARCHS, PRECISIONS, TrainConfig, Trainer, lr_at, plot_curves

__all__ = ["TrainConfig", "Trainer", "ARCHS", "PRECISIONS", "lr_at", "plot_curves", "TokenData", "WindowSampler", "load_data"]
