"""Models by name (:mod:`.registry`), the one preprocessing path (:mod:`.preprocess`),
and model bundles (:mod:`.bundle`)."""

from leukoscope.models.bundle import ModelBundle, NotABundleError, load_bundle, read_meta, save_bundle
from leukoscope.models.preprocess import normalize, prepare_image
from leukoscope.models.registry import ModelConfig, create_model, get_config, list_models, register_model

__all__ = [
    "ModelBundle", "NotABundleError", "load_bundle", "read_meta", "save_bundle", "normalize", "prepare_image",
    "ModelConfig", "create_model", "get_config", "list_models", "register_model",
]
