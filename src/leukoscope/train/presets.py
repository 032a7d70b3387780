"""Named training presets; every field can be overridden.

``paper``
    Matek et al. (2019): ResNeXt-50 (32x4d) from scratch at 400x400, any-angle
    rotation and flips, every class drawn up to ~10,000 images per epoch, early
    stopping on validation loss (the paper stopped after ~15 epochs). No stain jitter.
    A GPU job: on a CPU one epoch of 150,000 images at 400 px takes days.
``fast``
    A preset that learns on a laptop CPU; chosen by measurement on PBC
    (``docs/fast_preset.md``).
``robust``
    ``fast`` plus the cross-lab measures of ``docs/robustness.md``: the training
    images' µm/px estimated from their red cells where the data do not state it,
    HED stain jitter 0.1, saturation and gamma jitter 0.25, blur up to 1 px. Measured
    at a smaller budget: better on other labs' cells, 0.07 lower balanced accuracy on
    the training lab's own held-out cells.

>>> preset("paper").model
'resnext50_32x4d'
>>> preset("robust").scale
'estimate'
>>> preset("fast", epochs=2).epochs
2
"""

from __future__ import annotations

from leukoscope.train.loop import TrainConfig

PRESETS: dict[str, dict] = {
    "paper": dict(model="resnext50_32x4d", input_size=400, epochs=50, per_class=10_000, batch_size=32,
                  lr=1e-3, weight_decay=1e-4, warmup_epochs=0.2, schedule="constant", patience=5,
                  val_fraction=0.1, stain_jitter=0.0),
    "fast": dict(model="mobilenet_v3_small", input_size=128, epochs=6, per_class=800, batch_size=64,
                 lr=3e-3, weight_decay=1e-4, warmup_epochs=0.5, schedule="cosine", patience=100,
                 val_fraction=0.1, brightness=0.1, contrast=0.1),
}
PRESETS["robust"] = dict(PRESETS["fast"], scale="estimate", stain_jitter=0.1, saturation=0.25, gamma=0.25, blur=1.0)


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
