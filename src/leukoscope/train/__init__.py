"""Training: the config, augmentation, class balancing, the trainer, presets, cross-validation."""

from leukoscope.evaluate.calibration import fit_temperature
from leukoscope.train.config import TrainConfig
from leukoscope.train.cv import CVResult, cross_validate
from leukoscope.train.presets import PRESETS, list_presets, preset
from leukoscope.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "fit_temperature", "train", "PRESETS", "list_presets", "preset",
           "CVResult", "cross_validate"]
