"""Training images/s: the naive PyTorch loop against LeukoScope's training step, same model and batch.

    python benchmarks/train_throughput.py                       # ResNeXt-50 at 400x400, batch 8
    python benchmarks/train_throughput.py --model mobilenet_v3_small --input-size 128 --batch-size 64
    python benchmarks/train_throughput.py --smoke                # plain_cnn at 32 px, 1 step (tests)

naive: a ``torch.utils.data.DataLoader`` over the TIFF files (``num_workers=0``: two cores) that
decodes every image with PIL at every step and applies torchvision's ``RandomRotation(360)``,
horizontal/vertical flips, ``ToTensor`` and ``Normalize`` per image; fp32, eager, NCHW, glibc malloc.

ours: LeukoScope's training step as ``leukoscope.train.trainer.Trainer`` runs it: images decoded once
into the uint8 cache (``leukoscope.train.cache.build_cache``; its one-off time is reported apart),
a balanced batch indexed out of it, ``augment_batch`` (any-angle rotation with reflected corners
and flips for the whole batch as one ``grid_sample``), ``normalize``, channels-last, bf16 autocast
where the model's measured default and the CPU allow it, under tcmalloc.

Both: the same architecture and initial weights (seed 0), AdamW, cross-entropy, the same batch
size; one untimed warm-up step each, then ``--steps`` timed steps alternating naive / ours;
images/s from the median step. Images: the 48 real LMU TIFFs in ../shared/data/aml_lmu_sample,
or synthetic cells written as TIFFs when that folder is absent (``--synthetic`` forces them).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


# --------------------------------------------------------------------------- workers


def _setup_naive(cfg: dict):
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from leukoscope.models.registry import create_model, get_config

    mcfg = get_config(cfg["model"], input_size=cfg["input_size"])
    tf = [T.RandomRotation(360), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.ToTensor(),
          T.Normalize(mcfg.mean, mcfg.std)]
    if cfg["input_size"] != 400:
        tf.insert(0, T.Resize((cfg["input_size"], cfg["input_size"])))
    tf = T.Compose(tf)
    classes = sorted(set(cfg["labels"]))

    class Cells(Dataset):
        def __len__(self):
            return len(cfg["paths"])

        def __getitem__(self, i):
            with Image.open(cfg["paths"][i]) as im:
                img = im.convert("RGB")
            return tf(img), classes.index(cfg["labels"][i])

    torch.manual_seed(0)
    model = create_model(cfg["model"], num_classes=15, input_size=cfg["input_size"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    crit = torch.nn.CrossEntropyLoss()
    loader = DataLoader(Cells(), batch_size=cfg["batch_size"], shuffle=True, num_workers=0, drop_last=True)
    state = {"it": iter(loader)}

    def step():
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            x, y = next(state["it"])
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return {"setup": {"bf16": False, "channels_last": False}}, step


def _setup_ours(cfg: dict):
    import numpy as np
    import pandas as pd
    import torch

    from leukoscope.models.precision import autocast_context
    from leukoscope.models.pipeline import normalize
    from leukoscope.models.registry import create_model, get_config
    from leukoscope.train.augment import AugmentConfig, augment_batch
    from leukoscope.train.balance import balanced_epoch
    from leukoscope.train.cache import build_cache
    from leukoscope.train.bf16 import flag as _flag

    mcfg = get_config(cfg["model"], input_size=cfg["input_size"])
    table = pd.DataFrame({"path": cfg["paths"], "label": cfg["labels"]})
    t0 = time.perf_counter()
    cache = build_cache(table, cfg["input_size"], None, workers=C.torch_threads())
    cache_s = time.perf_counter() - t0
    classes = sorted(set(cfg["labels"]))
    y_all = np.array([classes.index(c) for c in cfg["labels"]])
    x_all = cache.images[torch.as_tensor(cache.rows(table["path"]))]
    bf16_ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    use_bf16 = _flag(cfg.get("bf16", "auto"), mcfg.cpu_bf16) and bf16_ok
    use_cl = mcfg.channels_last
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = create_model(cfg["model"], num_classes=15, input_size=cfg["input_size"]).train()
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    crit = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    aug = AugmentConfig(rotate=True, flip=True)
    bs = cfg["batch_size"]
    state = {"order": np.zeros(0, dtype=np.int64), "epoch": 0}

    def step():  # the body of leukoscope.train.trainer.Trainer.step
        if len(state["order"]) < bs:
            state["order"] = balanced_epoch(y_all, max(1, -(-len(y_all) // len(classes))), 0, state["epoch"])
            state["epoch"] += 1
        bi, state["order"] = state["order"][:bs], state["order"][bs:]
        xb = augment_batch(x_all[torch.as_tensor(bi)], gen, aug)
        yb = torch.as_tensor(y_all[bi])
        xb = normalize(xb, mcfg.mean, mcfg.std)
        if use_cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast_context("cpu", use_bf16):
            loss = crit(model(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return {"setup": {"bf16": bool(use_bf16), "channels_last": bool(use_cl), "cache_seconds": cache_s,
                      "cache_images": len(cache)}}, step


def worker_main(role: str, cfg: dict) -> int:
    holder = {}

    def setup():
        info, holder["step"] = (_setup_naive if role == "naive" else _setup_ours)(cfg)
        info["threads"] = C.torch_threads()
        return info

    def step():
        sec, loss = C.timed(holder["step"])
        return {"seconds": sec, "loss": loss}

    return C.serve(setup, {"step": step})


# --------------------------------------------------------------------------- parent


def run(args) -> dict:
    import torch

    tmp = tempfile.mkdtemp(prefix="leukoscope_bench_train_")
    need = max(args.batch_size, args.images)
    paths, labels, source = C.image_source(need, synthetic=args.synthetic, tmp=tmp)
    paths, labels = paths[:max(need, 1)], labels[:max(need, 1)]
    cfg = {"model": args.model, "input_size": args.input_size, "batch_size": args.batch_size,
           "paths": paths, "labels": labels, "bf16": args.bf16}
    script = Path(__file__).resolve()
    workers = {}
    try:
        workers["naive"] = C.Worker(script, "naive", cfg, tcmalloc=False)
        workers["ours"] = C.Worker(script, "ours", cfg, tcmalloc=not args.no_tcmalloc)
        times = {k: [] for k in workers}
        for rep in range(args.warmup + args.steps):
            for k, w in workers.items():  # alternate: naive, ours, naive, ours, ...
                r = w.call("step")
                if rep >= args.warmup:
                    times[k].append(r["seconds"])
                if args.verbose:
                    print(f"  step {rep} {k}: {r['seconds']:.2f}s loss {r['loss']:.3f}", file=sys.stderr)
        infos = {k: w.info for k, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    fwd = C.forward_flops(args.model, args.input_size)
    train_flops = 3 * fwd  # forward + backward ~ 3x forward (the usual MFU accounting)
    peak = C.cpu_peak()
    if args.peak_tflops:
        peak = {**peak, "fp32_tflops": args.peak_tflops, "bf16_tflops": args.peak_tflops, "how": "--peak-tflops"}
    rows = []
    for k in ("naive", "ours"):
        med = C.median(times[k])
        ips = args.batch_size / med
        bf16 = infos[k]["setup"]["bf16"]
        achieved = ips * train_flops / 1e12
        rows.append({"way": k, "median_step_s": med, "images_per_s": ips, "bf16": bf16,
                     "channels_last": infos[k]["setup"]["channels_last"], "tcmalloc": infos[k]["tcmalloc"],
                     "threads": infos[k]["threads"], "achieved_gflops": achieved * 1000,
                     "util_fp32_peak": achieved / peak["fp32_tflops"],
                     "util_own_peak": achieved / peak["bf16_tflops" if bf16 else "fp32_tflops"],
                     "step_seconds": times[k]})
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    cpu = C.cpu_info()
    return {
        "benchmark": "train_throughput", "model": args.model, "input_size": args.input_size,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "images": source,
        "n_images": len(paths), "cpu": cpu, "peak": peak, "torch": torch.__version__,
        "forward_gflops_per_image": fwd / 1e9, "train_gflops_per_image": train_flops / 1e9,
        "naive": rows[0], "ours": rows[1], "ratio": ratio,
        "cache_seconds": infos["ours"]["setup"].get("cache_seconds"),
        "cache_images": infos["ours"]["setup"].get("cache_images"),
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
    }


def report(res: dict) -> str:
    cols = ["way", "images_per_s", "median_step_s", "bf16", "channels_last", "tcmalloc", "threads",
            "achieved_gflops", "util_fp32_peak", "util_own_peak"]
    lines = [f"training throughput: {res['model']} at {res['input_size']}px, batch {res['batch_size']}, "
             f"median of {res['steps']} steps (after {res['warmup']} warm-up), naive/ours alternating",
             f"images: {res['images']}; CPU: {res['cpu']['model']} ({res['cpu']['cpus']} CPUs); torch {res['torch']}",
             f"model FLOPs: {res['forward_gflops_per_image']:.2f} GFLOP/image forward, "
             f"{res['train_gflops_per_image']:.1f} for a training step (3x); peak {res['peak']['fp32_tflops'] * 1000:.0f} "
             f"GFLOP/s fp32, {res['peak']['bf16_tflops'] * 1000:.0f} bf16 ({res['peak']['how']})",
             C.table([res["naive"], res["ours"]], cols),
             f"ratio ours/naive: {res['ratio']:.2f}x   (ours decodes {res['cache_images']} images once, "
             f"{res['cache_seconds']:.1f}s, before the first step; not in the step times)"]
    note = C.peak_note([res[w][k] for w in ("naive", "ours") for k in ("util_fp32_peak", "util_own_peak")])
    return "\n".join(lines + ([note] if note else []))


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per way (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--images", type=int, default=48, help="images in the training pool")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="ours: bf16 autocast")
    args = C.finish(ap, argv, "tiny settings for tests: plain_cnn, 32 px, batch 2, 1 step")
    return C.main_flow(args, worker_main, run, report,
                       dict(model="plain_cnn", input_size=32, batch_size=2, steps=1, warmup=0, images=4))


if __name__ == "__main__":
    raise SystemExit(main())
