"""When a run uses bf16: autocast while training, and whether the bundle infers in bf16."""

from __future__ import annotations

from leukoscope.models.precision import bf16_check

#: Largest probability change bf16 may make on the validation images for the bundle to infer in bf16.
MAX_INFERENCE_PROB_DIFF = 0.02


def flag(value, default: bool) -> bool:
    """A setting ``auto``/``on``/``off`` (or a bool) as a bool; ``auto`` is ``default``."""
    if isinstance(value, bool):
        return value
    v = str(value).lower()
    if v == "auto":
        return default
    return v in ("on", "true", "1", "yes")


def inference_bf16(z32, z16) -> tuple[bool, dict]:
    """``(use bf16 for inference, metadata to record)`` from fp32 and bf16 logits of the validation images.

    bf16 is used only where, with near-ties re-run in fp32, it gives fp32's calls
    (:func:`leukoscope.models.precision.bf16_check`) and moves no probability by
    :data:`MAX_INFERENCE_PROB_DIFF` or more.
    """
    check = bf16_check(z32, z16)
    use = bool(check["inference_bf16"] and check["max_abs_prob_diff"] < MAX_INFERENCE_PROB_DIFF)
    return use, {"bf16_guard": check["bf16_guard"], "bf16_check": check}
