"""GPU training throughput and model-FLOP utilisation of the paper preset, beside the naive loop.

    benchmarks/gpu.sh OUT_DIR                                   # on one H100/H200, < 5 minutes
    python benchmarks/gpu_train.py --out OUT_DIR [--compile]
    python benchmarks/gpu_train.py --device cpu --steps 2 --batch-size 2 --out OUT_DIR   # smoke test on a CPU

ours: ResNeXt-50 32x4d at 400x400 (``--model``/``--input-size`` to change), bf16 autocast,
channels-last, a pool of synthetic uint8 cells already on the GPU, LeukoScope's batched
augmentation (``augment_batch``: rotation + flips as one ``grid_sample``) on the GPU, AdamW
(fused on CUDA); optional ``torch.compile`` with its compile time reported apart.

naive: the same model in fp32 (PyTorch's defaults: cuDNN may use TF32 for convolutions), NCHW,
eager, fed by a ``DataLoader`` whose workers apply torchvision's per-image PIL transforms
(``RandomRotation(360)``, flips, ``ToTensor``, ``Normalize``) on the CPU, copied to the device
every step.

Batch: ``--batch-size auto`` sizes it to the card's memory (halved on out-of-memory). Timing:
``--warmup`` untimed steps, then ``--steps`` timed steps synchronised with the device; images/s
from the total time. MFU = images/s x 3 x forward FLOPs (``torch.utils.flop_counter``) / the
card's dense peak for the precision (table below; ``--peak-tflops`` to override).

Writes ``gpu_train.json`` (and prints it) into ``--out`` or ``$OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

#: Dense (no sparsity) peak TFLOP/s by card, from NVIDIA's data sheets: bf16 tensor cores, TF32
#: tensor cores, fp32 CUDA cores. Matched against ``torch.cuda.get_device_name()`` in this order.
GPU_PEAKS = (
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0, "card": "H200 SXM (H200 NVL: 835 bf16)"}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0, "card": "H100 NVL"}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0, "card": "H100 PCIe"}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0, "card": "H100 SXM5 (80GB HBM3)"}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5, "card": "A100 SXM/PCIe"}),
)


def device_peak(device, override: float | None) -> dict:
    import torch

    if override:
        return {"bf16": override, "tf32": override, "fp32": override, "card": "--peak-tflops", "source": "argument"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS:
            if key in name:
                return {**peak, "source": f"data sheet for {key} (device {name!r})"}
        return {"bf16": float("nan"), "tf32": float("nan"), "fp32": float("nan"), "card": name,
                "source": "unknown card: give --peak-tflops"}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common as C

    p = C.cpu_peak()
    return {"bf16": p["bf16_tflops"], "tf32": p["fp32_tflops"], "fp32": p["fp32_tflops"], "card": C.cpu_info()["model"],
            "source": p["how"]}


def forward_flops(model_name: str, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from leukoscope.models.registry import create_model

    with torch.device("meta"):
        m = create_model(model_name, num_classes=15, input_size=size).eval()
        with FlopCounterMode(display=False) as fc:
            m(torch.empty(1, 3, size, size))
    return float(fc.get_total_flops())


def auto_batch(device) -> int:
    import torch

    if device.type != "cuda":
        return 8
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 256 if gib >= 120 else 128 if gib >= 70 else 64 if gib >= 35 else 32


def synth_pool(n: int, size: int, seed: int = 0):
    """``n`` synthetic cells (uint8 NHWC) and labels; a few drawn cells repeated (drawing is slow)."""
    import numpy as np

    from leukoscope import taxonomy
    from leukoscope.synth import make_cell

    k = min(n, 30)
    cells = np.stack([make_cell(taxonomy.CLASSES[i % 15], seed=seed + i, size=size) for i in range(k)])
    idx = np.arange(n) % k
    return cells[idx], (idx % 15).astype("int64")


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, warmup: int, steps: int, device):
    """Run ``warmup`` untimed then ``steps`` timed steps (synchronised): (seconds, last loss)."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step()
    sync(device)
    return time.perf_counter() - t0, loss


def run_ours(args, device, pool_u8, labels, batch: int) -> dict:
    import torch

    from leukoscope.models.precision import autocast_context
    from leukoscope.models.pipeline import normalize
    from leukoscope.models.registry import create_model, get_config
    from leukoscope.train.augment import AugmentConfig, augment_batch

    mcfg = get_config(args.model, input_size=args.input_size)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=15, input_size=args.input_size).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4,
                            **({"fused": True} if device.type == "cuda" else {}))
    crit = torch.nn.CrossEntropyLoss()
    x_all = torch.from_numpy(pool_u8).to(device)
    y_all = torch.from_numpy(labels).to(device)
    gen = torch.Generator().manual_seed(0)
    aug = AugmentConfig()
    bf16 = device.type == "cuda" or (args.cpu_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    net = model
    compile_s = None
    if args.compile:
        net = torch.compile(model)

    def step():
        idx = torch.randint(0, len(x_all), (batch,), generator=gen).to(device)
        xb = augment_batch(x_all[idx], gen, aug)
        xb = normalize(xb, mcfg.mean, mcfg.std).contiguous(memory_format=torch.channels_last)
        with autocast_context(device, bf16):
            loss = crit(net(xb).float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if args.compile:
        t0 = time.perf_counter()
        step()
        sync(device)
        compile_s = time.perf_counter() - t0
    sec, loss = timed_steps(step, args.warmup, args.steps, device)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": batch * args.steps / sec, "seconds": sec, "steps": args.steps, "batch_size": batch,
            "precision": "bf16" if bf16 else "fp32", "channels_last": True, "compiled": bool(args.compile),
            "compile_seconds": compile_s, "loss": float(loss), "max_memory_gib": mem}


def run_naive(args, device, pool_u8, labels, batch: int) -> dict:
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from leukoscope.models.registry import create_model, get_config

    mcfg = get_config(args.model, input_size=args.input_size)
    tf = T.Compose([T.RandomRotation(360), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.ToTensor(),
                    T.Normalize(mcfg.mean, mcfg.std)])

    class Cells(Dataset):
        def __len__(self):
            return len(pool_u8)

        def __getitem__(self, i):
            return tf(Image.fromarray(pool_u8[i])), int(labels[i])

    workers = args.naive_workers if args.naive_workers is not None else min(8, os.cpu_count() or 1)
    if device.type != "cuda":
        workers = 0
    loader = DataLoader(Cells(), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=15, input_size=args.input_size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    crit = torch.nn.CrossEntropyLoss()
    it = iter(loader)

    def step():
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    sec, loss = timed_steps(step, args.naive_warmup, args.naive_steps, device)
    return {"images_per_s": batch * args.naive_steps / sec, "seconds": sec, "steps": args.naive_steps,
            "batch_size": batch, "precision": "fp32 (TF32 convolutions allowed: "
            f"{bool(torch.backends.cudnn.allow_tf32)})" if device.type == "cuda" else "fp32",
            "channels_last": False, "compiled": False, "loader_workers": workers, "loss": float(loss)}


def with_oom_retry(fn, args, device, pool, labels, batch):
    import torch

    while True:
        try:
            return fn(args, device, pool, labels, batch)
        except torch.OutOfMemoryError:
            if batch <= 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
            print(f"out of memory: retrying with batch {batch}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--model", default="resnext50_32x4d")
    ap.add_argument("--input-size", type=int, default=400)
    ap.add_argument("--batch-size", default="auto", help="a number, or auto (sized to the card)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of ours")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--naive-steps", type=int, help="timed steps of naive (default: min(steps, 5))")
    ap.add_argument("--naive-warmup", type=int, default=1)
    ap.add_argument("--naive-workers", type=int, help="DataLoader workers of naive (default min(8, CPUs); 0 on CPU)")
    ap.add_argument("--pool", type=int, default=512, help="synthetic cells in the pool")
    ap.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    ap.add_argument("--cpu-bf16", action="store_true", help="on --device cpu, bf16 autocast for ours")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_train.json (default $OUT)")
    args = ap.parse_args(argv)

    import torch

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch = auto_batch(device) if args.batch_size == "auto" else int(args.batch_size)
    args.naive_steps = args.naive_steps if args.naive_steps is not None else min(args.steps, 5)
    t0 = time.perf_counter()
    pool, labels = synth_pool(max(args.pool, batch), args.input_size)
    pool_s = time.perf_counter() - t0
    fwd = forward_flops(args.model, args.input_size)
    peak = device_peak(device, args.peak_tflops)
    results = {}
    results["ours"] = with_oom_retry(run_ours, args, device, pool, labels, batch)
    if args.compile:
        # eager and compiled both reported: compile is optional
        args_eager = argparse.Namespace(**{**vars(args), "compile": False})
        results["ours_eager"] = with_oom_retry(run_ours, args_eager, device, pool, labels, results["ours"]["batch_size"])
    if not args.skip_naive:
        results["naive"] = with_oom_retry(run_naive, args, device, pool, labels, results["ours"]["batch_size"])
    for k, r in results.items():
        p = peak["bf16"] if r["precision"] == "bf16" else (peak["tf32"] if "TF32 convolutions allowed: True" in r["precision"]
                                                          else peak["fp32"])
        r["achieved_tflops"] = r["images_per_s"] * 3 * fwd / 1e12
        r["peak_tflops_used"] = p
        r["mfu"] = r["achieved_tflops"] / p if p == p and p else float("nan")
    out = {
        "benchmark": "gpu_train", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": args.model, "input_size": args.input_size,
        "forward_gflops_per_image": fwd / 1e9, "train_gflops_per_image": 3 * fwd / 1e9, "peak": peak,
        "pool_seconds": pool_s, **results,
        "ratio": results["ours"]["images_per_s"] / results["naive"]["images_per_s"] if "naive" in results else None,
        "command": "python benchmarks/gpu_train.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_train.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
