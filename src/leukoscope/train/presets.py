"""Named training presets: flat settings of :class:`~leukoscope.train.config.TrainConfig`; every one can be overridden.

``paper``
    Matek et al. (2019): ResNeXt-50 (32x4d) from scratch at 400x400, any-angle
    rotation and flips, every class drawn up to ~10,000 images per epoch, early
    stopping on validation loss (the paper stopped after ~15 epochs). No stain jitter.
    A GPU job: on a CPU one epoch of 150,000 images at 400 px takes days.
``fast``
    A preset that learns on a laptop CPU in minutes; chosen by measurement on PBC
    (``docs/fast_preset.md``). Knows one lab: on other labs' cells it is poor
    (``docs/robustness.md``). The demo's preset.
``robust`` (the default of ``leukoscope train`` and ``cv``)
    ``fast``'s model and input with the cross-lab measures of ``docs/robustness.md``:
    the training images' µm/px estimated from their red cells where the data do not
    state it, every image white-balanced on its own background (also at inference),
    HED stain jitter 0.1, saturation and gamma jitter 0.25, blur up to 1 px, and 18
    epochs instead of 6 (augmented images need them: at 6 epochs the measures cost
    about 0.04 balanced accuracy on the training lab's own cells, at 18 none; measured
    on PBC, two seeds).

>>> preset("paper").model
'resnext50_32x4d'
>>> preset("robust").scale, preset("robust").white_balance
('estimate', True)
>>> preset("fast", epochs=2).epochs
2
"""

from __future__ import annotations

from leukoscope.train.config import TrainConfig

PRESETS: dict[str, dict] = {
    "paper": dict(model="resnext50_32x4d", input_size=400, epochs=50, per_class=10_000, batch_size=32,
                  lr=1e-3, weight_decay=1e-4, warmup_epochs=0.2, schedule="constant", patience=5,
                  val_fraction=0.1, stain_jitter=0.0),
    "fast": dict(model="mobilenet_v3_small", input_size=128, epochs=6, per_class=800, batch_size=64,
                 lr=3e-3, weight_decay=1e-4, warmup_epochs=0.5, schedule="cosine", patience=100,
                 val_fraction=0.1, brightness=0.1, contrast=0.1),
}
PRESETS["robust"] = dict(PRESETS["fast"], epochs=18, scale="estimate", white_balance=True, stain_jitter=0.1,
                         saturation=0.25, gamma=0.25, blur=1.0)
#: The preset of ``leukoscope train``/``cv`` when none is named: a model that other labs can use.
DEFAULT_PRESET = "robust"


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset(name: str, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` with ``overrides`` (``None`` values ignored)."""
    try:
        base = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}") from None
    base.update({k: v for k, v in overrides.items() if v is not None})
    base["preset"] = name
    return TrainConfig(**base)
