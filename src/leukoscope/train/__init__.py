"""Training: augmentation, class balancing, the loop, presets, cross-validation."""

from leukoscope.train.loop import TrainConfig, TrainResult, fit_temperature, train
from leukoscope.train.presets import PRESETS, list_presets, preset
from leukoscope.train.cv import CVResult, cross_validate

__all__ = ["TrainConfig", "TrainResult", "fit_temperature", "train", "PRESETS", "list_presets", "preset", "CVResult", "cross_validate"]
