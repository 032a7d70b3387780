"""Numeric precision of inference: bf16 autocast on CPU where it pays, and the check that decides it.

A bundle whose ``inference_bf16`` is set runs in bf16 on CPU and re-runs in fp32 every image whose
top-two probabilities lie closer than its ``bf16_guard`` (:func:`bf16_check`, measured on the
validation images at training time): bf16's speed where the call is clear, fp32's answer where it
is close. :func:`leukoscope.models.inference.forward` applies it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast_context(device, bf16: bool):
    """bf16 autocast on CPU when asked; AMP (bf16, else fp16) on CUDA; nothing otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


#: Top-two probability margin below which a bf16 call is re-run in fp32, for bundles that do not
#: record their own (``bf16_guard``, measured by :func:`bf16_check` at training time).
DEFAULT_BF16_GUARD = 0.05
#: bf16 inference is switched on only when at most this fraction of validation images needs the fp32 re-run.
MAX_BF16_RECHECK = 0.25


def top2_margin(z):
    """Difference of the two largest softmax probabilities per row (uncalibrated logits ``z``)."""
    top = torch.softmax(z.double(), 1).topk(min(2, z.shape[1]), dim=1).values
    return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)


def bf16_check(z32, z16, *, safety: float = 2.0, min_guard: float = 0.01,
               max_recheck: float = MAX_BF16_RECHECK) -> dict:
    """Decide whether a model may run in bf16 on CPU, from fp32 and bf16 logits of the same images.

    bf16's call ``a`` differs from fp32's only if, for some class ``c``, bf16 moved the gap
    ``p[a] - p[c]`` by more than bf16's own gap, which is at least its top-two margin. So the
    quantity to bound is the largest such move over the images (``max_gap_shift``; at most twice
    the largest single probability shift, ``max_abs_prob_diff``, and usually much less because the
    two probabilities move together). The guard is that bound times ``safety`` (at least
    ``min_guard``); images whose bf16 top-two margin is under it are re-run in fp32 by
    :func:`leukoscope.models.inference.forward`. bf16 is worth it (``inference_bf16``) when the re-run images are at
    most ``max_recheck`` of the set and, with the re-run, every call equals fp32's.
    """
    z32, z16 = torch.as_tensor(z32).float(), torch.as_tensor(z16).float()
    if len(z32) == 0:
        return {"inference_bf16": False, "bf16_guard": DEFAULT_BF16_GUARD, "reason": "no images to check on"}
    p32, p16 = torch.softmax(z32.double(), 1), torch.softmax(z16.double(), 1)
    max_dp = float((p32 - p16).abs().max())
    d = p16 - p32
    a = p16.argmax(1, keepdim=True)
    max_gap_shift = float((d.gather(1, a) - d).abs().max())
    guard = max(min_guard, safety * max_gap_shift)
    near = top2_margin(z16) < guard
    cascade = torch.where(near[:, None], z32, z16)
    agree = float((cascade.argmax(1) == z32.argmax(1)).float().mean())
    agree_plain = float((z16.argmax(1) == z32.argmax(1)).float().mean())
    frac = float(near.float().mean())
    ok = agree == 1.0 and frac <= max_recheck
    reason = "" if ok else (f"{frac:.0%} of the images lie within the guard {guard:.3g} of a tie (more than "
                            f"{max_recheck:.0%}: bf16 would not pay)" if agree == 1.0 else
                            f"bf16 with fp32 re-runs still changed {1 - agree:.1%} of the calls")
    return {"inference_bf16": bool(ok), "bf16_guard": float(guard), "n": int(len(z32)),
            "max_abs_prob_diff": max_dp, "max_gap_shift": max_gap_shift, "recheck_fraction": frac,
            "agreement_bf16_alone": agree_plain, "agreement_with_recheck": agree, "reason": reason}
