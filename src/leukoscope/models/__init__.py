"""Models by name (:mod:`.registry`), the preprocessing pipeline a bundle stores (:mod:`.pipeline`),
model bundles (:mod:`.bundle`), the one inference path (:mod:`.inference`), inference precision
(:mod:`.precision`), the out-of-distribution reference (:mod:`.ood`) and ONNX export (:mod:`.export`)."""

from leukoscope.models.bundle import ModelBundle, NotABundleError, load_bundle, read_meta, save_bundle
from leukoscope.models.inference import forward, prepare_batch
from leukoscope.models.pipeline import Pipeline, normalize, prepare_image
from leukoscope.models.registry import ModelConfig, create_model, get_config, list_models, register_model

__all__ = [
    "ModelBundle", "NotABundleError", "load_bundle", "read_meta", "save_bundle", "normalize", "prepare_image",
    "Pipeline", "forward", "prepare_batch",
    "ModelConfig", "create_model", "get_config", "list_models", "register_model",
]
