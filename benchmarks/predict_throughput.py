"""Inference cells/s: naive eager fp32 against LeukoScope's ``predict`` path and its ONNX export.

    python benchmarks/predict_throughput.py                      # ResNeXt-50 at 400x400, batch 8
    python benchmarks/predict_throughput.py --images 256         # agreement over more images (slower)
    python benchmarks/predict_throughput.py --smoke              # plain_cnn at 32 px (tests)
    python benchmarks/predict_throughput.py --bundle runs/resnext400/model.safetensors \
        --data ../shared/data/pbc --split runs/rob/pbc_split.csv --fold 0 --images 256
                                     # a trained bundle on held-out real cells (agreement that means something)

The model: the architecture from seed 0 with its BatchNorm statistics re-estimated on 8 of the
images (train-mode forward passes, no gradient) and its head's bias centred on their features,
then in eval mode and saved as a LeukoScope bundle. Trained nothing, but unlike raw random
weights its argmax varies from image to image; the table reports how many distinct classes it
predicts and the median top-1/top-2 margin. Its probabilities are nearly flat, so bf16 flips
many calls: with ``--bundle`` a trained model is measured instead (``benchmarks/trained_resnext.py``
makes one), on the images of ``--data`` (``--split``/``--fold``: the held-out fold only).

Whether bf16 may be used, and its guard (top-two margin under which a call is re-run in fp32),
come from :func:`leukoscope.models.precision.bf16_check` on calibration images that are not timed
(as training decides it on its validation images), unless the trained bundle records them.

Ways (each in its own process, driven in turn by this one, same images, same batch size):

* ``naive``: the weights loaded into the torchvision model, eval, ``torch.no_grad``,
  ``ToTensor``/``Normalize``-style float NCHW batches, fp32, eager, glibc malloc.
* ``ours``: ``load_bundle(...).predict_proba_prepared(uint8 batch)``: the one forward pass of
  ``leukoscope predict``, ``evaluate``, ``cv`` and ``screen`` (:func:`leukoscope.models.inference.forward`;
  fp32 on CPU runs through onnxruntime, the model exported in memory once per process), under
  tcmalloc as the ``leukoscope`` command runs it. The bundle says
  ``inference_bf16: true`` with the guard of ``bf16_check`` (near-ties re-run in fp32; the table's
  ``rechecked`` column counts them), whatever the check concluded, to show what bf16 costs and
  gives (``--bf16 off``: fp32 bundle); ``bf16_check`` says whether training would switch it on.
* ``ours_fp32``: the same path with a bundle that says ``inference_bf16: false``.
* ``ours_torch`` (only with ``--torch``): ``ours_fp32`` with the forward's PyTorch backend
  (``backend="torch"``: eager, channels-last, ``inference_mode``), for comparison.
* ``onnx``: ``leukoscope.models.export.export_onnx`` then onnxruntime (CPU provider, default
  graph optimisations = all), fp32; export time reported apart.
* ``compiled`` (only with ``--compile``): the fp32 bundle's model under ``torch.compile``
  (inductor, ``freezing``: BatchNorm folded, weights pre-packed); its compile time is the
  warm-up batch's, reported apart.

Timing: one untimed warm-up batch per way, then ``--rounds`` rounds of one batch per way in turn;
cells/s from the median batch. Images are prepared once beforehand and every way gets the same
prepared pixels: with ``--bundle`` through the bundle's own pipeline (white balance, physical
scale by the scale policy as ``leukoscope predict`` resolves it, crop/pad; the preparation is
timed apart: decode and pipeline cells/s), otherwise resized to the model's size. The figures are
the model's cells/s, not the disk's. Agreement: argmax of every way against
``naive`` on the rounds' images, and of ``ours`` against ``onnx`` (fp32) on all ``--images``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WAYS = ("naive", "ours", "ours_fp32", "onnx", "ours_torch", "compiled")
DEFAULT_WAYS = WAYS[:4]


# --------------------------------------------------------------------------- model and images


def prepare_images(paths, size: int) -> np.ndarray:
    from leukoscope.imaging.images import load_rgb
    from leukoscope.models.pipeline import prepare_image

    return np.stack([prepare_image(load_rgb(p), size) for p in paths])


def prepare_for_bundle(bundle_path: str, paths, inputs) -> tuple[np.ndarray, dict]:
    """``paths`` through the bundle's pipeline at the µm/px ``leukoscope predict`` would use
    (:func:`leukoscope.predict.input_scale`); decode and pipeline timed apart."""
    from leukoscope.imaging.images import load_rgb
    from leukoscope.imaging.scale_policy import ScalePolicy
    from leukoscope.models.bundle import load_bundle
    from leukoscope.predict import _trained_on_estimated_scale, input_scale

    bundle = load_bundle(bundle_path)
    t0 = time.perf_counter()
    policy = ScalePolicy(estimate="group" if _trained_on_estimated_scale(bundle) else "off")
    ums, rec = input_scale(inputs, [Path(p) for p in paths], policy)
    t1 = time.perf_counter()
    imgs = [load_rgb(p) for p in paths]
    t2 = time.perf_counter()
    x = np.stack([bundle.pipeline.prepare(img, ums.get(str(p))) for img, p in zip(imgs, paths)])
    t3 = time.perf_counter()
    n = len(paths)
    return x, {"scale": rec["origin"], "scale_seconds": t1 - t0, "decode_cells_per_s": n / (t2 - t1),
               "pipeline_cells_per_s": n / (t3 - t2),
               "pipeline": [s["name"] for s in bundle.pipeline.to_dict()["steps"]]}


def make_bundle(model_name: str, size: int, calib: np.ndarray, path: Path, bf16: bool,
                path_fp32: Path | None = None) -> dict:
    """Seeded weights, BatchNorm re-estimated on ``calib``, head bias centred; saved as a bundle
    (and, with ``path_fp32``, the same weights in a bundle that says ``inference_bf16: false``)."""
    import torch

    from leukoscope import taxonomy
    from leukoscope.models.bundle import make_meta, save_bundle
    from leukoscope.models.pipeline import normalize
    from leukoscope.models.registry import create_model, get_config

    cfg = get_config(model_name, input_size=size)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(taxonomy.CLASSES), input_size=size)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats = []
    hook = head.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].detach()))
    t0 = time.perf_counter()
    with torch.no_grad():
        model.train()
        model(normalize(calib, cfg.mean, cfg.std))
        model.eval()
        feats.clear()
        model(normalize(calib, cfg.mean, cfg.std))
        hook.remove()
        head.bias -= (feats[0] @ head.weight.T).mean(0)
    meta = make_meta(classes=taxonomy.CLASSES, model=model_name, input_size=size, mean=cfg.mean, std=cfg.std,
                     um_per_px=cfg.um_per_px, temperature=1.0, channels_last=True, inference_bf16=bf16)
    seconds = time.perf_counter() - t0
    return {"calibration_seconds": seconds, **write_bundles(model, meta, calib, path, bf16, path_fp32)}


def write_bundles(model, meta: dict, calib, path: Path, bf16: bool, path_fp32: Path | None) -> dict:
    """Save ``model`` as the bf16 bundle (guard from :func:`bf16_check` on ``calib`` unless ``meta`` has one)
    and the fp32 bundle; returns the check."""
    import torch

    from leukoscope.models.bundle import save_bundle
    from leukoscope.models.inference import forward_logits
    from leukoscope.models.precision import bf16_check

    check = {}
    if bf16 and "bf16_guard" not in meta:
        x = torch.as_tensor(calib)
        z32 = forward_logits(model, x, meta["mean"], meta["std"], batch_size=8, bf16=False)
        z16 = forward_logits(model, x, meta["mean"], meta["std"], batch_size=8, bf16=True)
        check = bf16_check(z32, z16)
        meta = {**meta, "bf16_guard": check["bf16_guard"]}
    elif "bf16_guard" in meta:
        check = {"bf16_guard": meta["bf16_guard"], "from": "the bundle"}
    save_bundle(model, {**meta, "inference_bf16": bf16}, path)
    if path_fp32 is not None:
        save_bundle(model, {**meta, "inference_bf16": False}, path_fp32)
    return {"bf16_check": check}


def trained_bundles(src: str, calib, path: Path, bf16: bool, path_fp32: Path) -> dict:
    """A trained bundle, re-saved as the bf16 and the fp32 bundle of the benchmark."""
    from leukoscope.models.bundle import load_bundle

    b = load_bundle(src)
    meta = {k: v for k, v in b.meta.items() if k not in ("inference_bf16",)}
    return write_bundles(b.model, meta, calib, path, bf16, path_fp32)


def data_images(args, n: int) -> tuple[list[str], str]:
    """``n`` image paths of ``--data`` (only ``--fold`` of ``--split`` when given), classes interleaved, seeded."""
    from leukoscope.data import read_dataset, read_split

    table = read_dataset(args.data).table
    note = f"{args.data}"
    if args.split:
        sp = read_split(args.split)
        keep = set(sp.loc[sp["fold"] == args.fold, "path"].astype(str))
        table = table[table["path"].astype(str).isin(keep)]
        note += f" (fold {args.fold} of {args.split}, not trained on)"
    table = table.sample(frac=1.0, random_state=0)
    table = table.assign(_r=table.groupby("label").cumcount()).sort_values(["_r", "label"], kind="stable")
    paths = table["path"].astype(str).tolist()[:n]
    return paths, f"{len(paths)} images of {note}"


# --------------------------------------------------------------------------- workers


holder_rechecked: list[int] = []  # images re-run in fp32 per call (bf16 bundles), read by worker_main


def _setup(role: str, cfg: dict):
    import torch

    images = np.load(cfg["images"])
    bs = cfg["batch_size"]
    info: dict = {}
    if role == "naive":
        import torchvision.transforms as T
        from safetensors.torch import load_file

        from leukoscope.models.bundle import read_meta
        from leukoscope.models.registry import create_model

        meta = read_meta(cfg["bundle"])
        model = create_model(meta["model"], num_classes=len(meta["classes"]), input_size=meta["input_size"],
                             **((meta.get("config") or {}).get("model_kwargs") or {}))
        model.load_state_dict(load_file(cfg["bundle"]))
        model.eval()
        norm = T.Normalize(meta["mean"], meta["std"])

        def probs(x):
            with torch.no_grad():
                t = norm(torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255))
                return torch.softmax(model(t).double(), 1).numpy()

        info.update(bf16=False, channels_last=False)
    elif role in ("ours", "ours_fp32", "ours_torch", "compiled"):
        from leukoscope.models.bundle import load_bundle

        bundle = load_bundle(cfg["bundle"] if role == "ours" else cfg["bundle_fp32"])
        if role in ("ours_torch", "compiled"):
            bundle.backend = "torch"
        if role == "compiled":  # fp32 bundle under torch.compile (inductor, weights frozen: BN folded)
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            bundle.model = torch.compile(bundle.model)

        def probs(x):
            p = bundle.predict_proba_prepared(torch.from_numpy(x), batch_size=bs)
            holder_rechecked.append(bundle.last_fp32_rechecked)
            return p

        info.update(bf16=bool(bundle.meta.get("inference_bf16")), channels_last=bool(bundle.meta.get("channels_last")))
    elif role == "onnx":
        import onnxruntime as ort

        from leukoscope.models.bundle import load_bundle
        from leukoscope.models.export import export_onnx

        bundle = load_bundle(cfg["bundle"])
        onnx_path = str(Path(cfg["images"]).with_name("model.onnx"))
        t0 = time.perf_counter()
        check = export_onnx(bundle, onnx_path)
        info["export_seconds"] = time.perf_counter() - t0
        info["export_max_abs_diff"] = check["max_abs_diff"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = C.torch_threads()
        sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        t = bundle.temperature

        def probs(x):
            z = sess.run(["logits"], {"input": bundle.pipeline.normalize(x).contiguous().numpy()})[0]
            return torch.softmax(torch.from_numpy(z).double() / t, 1).numpy()

        info.update(bf16=False, channels_last=False, onnxruntime=ort.__version__)
    else:
        raise ValueError(role)
    return info, images, probs


def worker_main(role: str, cfg: dict) -> int:
    holder = {}

    def setup():
        info, holder["images"], holder["probs"] = _setup(role, cfg)
        info["threads"] = C.torch_threads()
        return info

    def batch(i: int):
        bs = cfg["batch_size"]
        x = holder["images"][i * bs:(i + 1) * bs]
        holder_rechecked.clear()
        sec, p = C.timed(lambda: holder["probs"](x))
        return {"seconds": sec, "probs": np.asarray(p, dtype=np.float64).tolist(), "rechecked": sum(holder_rechecked)}

    return C.serve(setup, {"batch": batch})


# --------------------------------------------------------------------------- parent


def _agree(a: np.ndarray, b: np.ndarray) -> dict:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return {"n": int(n), "agreement": float((a.argmax(1) == b.argmax(1)).mean()) if n else float("nan"),
            "max_abs_prob_diff": float(np.abs(a - b).max()) if n else float("nan")}


def run(args) -> dict:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="leukoscope_bench_predict_"))
    n_img = max(args.images, args.rounds * args.batch_size, args.batch_size)
    n_calib = 8 if not args.bundle else args.calib
    if args.bundle:  # a trained model: its own name and input size
        from leukoscope.models.bundle import read_meta

        meta = read_meta(args.bundle)
        args.model, args.input_size = meta["model"], int(meta["input_size"])
    if args.data:
        paths, source = data_images(args, n_img + n_calib)
    else:
        paths, _, source = C.image_source(n_img + (n_calib if args.bundle else 0), synthetic=args.synthetic,
                                          tmp=str(tmp))
    t0 = time.perf_counter()
    prep_info: dict = {}
    if args.bundle:  # the same prepared pixels for every way: the bundle's pipeline, as predict runs it
        images, prep_info = prepare_for_bundle(args.bundle, paths[:n_img + n_calib], [args.data] if args.data else [])
    else:
        images = prepare_images(paths[:n_img + n_calib], args.input_size)
    prep_s = time.perf_counter() - t0
    if args.bundle:  # calibration images apart from the timed ones (as training checks on validation images)
        calib, images = images[n_img:], images[:n_img]
    else:
        images = images[:n_img]
        calib = images[:min(n_calib, len(images))]
    np.save(tmp / "images.npy", images)
    bf16_cpu = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    from leukoscope.models.registry import get_config

    use_bf16 = {"on": True, "off": False}.get(args.bf16, get_config(args.model).cpu_bf16 and bf16_cpu)
    if args.bundle:
        made = trained_bundles(args.bundle, calib, tmp / "model.safetensors", use_bf16, tmp / "model_fp32.safetensors")
    else:
        made = make_bundle(args.model, args.input_size, torch.from_numpy(calib), tmp / "model.safetensors", use_bf16,
                           tmp / "model_fp32.safetensors")
    cfg = {"images": str(tmp / "images.npy"), "bundle": str(tmp / "model.safetensors"),
           "bundle_fp32": str(tmp / "model_fp32.safetensors"), "batch_size": args.batch_size}
    n_batches = -(-len(images) // args.batch_size)
    script = Path(__file__).resolve()
    ways = [w for w in WAYS if (w in DEFAULT_WAYS or (w == "compiled" and args.compile)
                                or (w == "ours_torch" and args.torch)) and w not in args.skip]
    workers, times, probs = {}, {w: [] for w in ways}, {w: [] for w in ways}
    rechecked = {w: 0 for w in ways}
    try:
        for w in ways:
            workers[w] = C.Worker(script, w, cfg, tcmalloc=(w != "naive" and not args.no_tcmalloc))
        warm = {w: workers[w].call("batch", i=0)["seconds"] for w in ways}  # warm-up (compiles)
        for r in range(n_batches):
            for w in ways:
                if r >= args.rounds and w not in ("ours", "onnx"):
                    continue  # after the timed rounds only ours and the fp32 reference go on, for agreement
                out = workers[w].call("batch", i=r)
                if r < args.rounds:
                    times[w].append(out["seconds"])
                probs[w].append(np.array(out["probs"]))
                rechecked[w] += int(out.get("rechecked", 0))
                if args.verbose:
                    print(f"  batch {r} {w}: {out['seconds']:.2f}s", file=sys.stderr)
        infos = {w: workers[w].info for w in ways}
    finally:
        for wk in workers.values():
            wk.close()
    probs = {w: np.concatenate(p) for w, p in probs.items()}

    fwd = C.forward_flops(args.model, args.input_size)
    peak = C.cpu_peak()
    if args.peak_tflops:
        peak = {**peak, "fp32_tflops": args.peak_tflops, "bf16_tflops": args.peak_tflops, "how": "--peak-tflops"}
    rows = {}
    for w in ways:
        med = C.median(times[w])
        cps = args.batch_size / med
        achieved = cps * fwd / 1e12
        bf16 = infos[w]["bf16"]
        rows[w] = {"way": w, "cells_per_s": cps, "median_batch_s": med, "bf16": bf16,
                   "channels_last": infos[w]["channels_last"], "tcmalloc": infos[w]["tcmalloc"],
                   "threads": infos[w]["threads"], "achieved_gflops": achieved * 1000,
                   "rechecked": f"{rechecked[w]}/{len(probs[w])}" if infos[w]["bf16"] else "",
                   "util_fp32_peak": achieved / peak["fp32_tflops"],
                   "util_own_peak": achieved / peak["bf16_tflops" if bf16 else "fp32_tflops"],
                   "batch_seconds": times[w]}
        if "naive" in probs and w != "naive":
            a = _agree(probs[w], probs["naive"])
            rows[w]["ratio"] = cps / rows["naive"]["cells_per_s"] if "naive" in rows else float("nan")
            rows[w]["agree_naive"] = a["agreement"]
            rows[w]["n_agree_naive"] = a["n"]
            rows[w]["max_dp_naive"] = a["max_abs_prob_diff"]
    if "naive" in rows:
        rows["naive"].update(ratio=1.0, agree_naive=1.0, n_agree_naive=len(probs["naive"]), max_dp_naive=0.0)
    ref = "onnx" if "onnx" in probs else ("naive" if "naive" in probs else None)
    agreement = _agree(probs["ours"], probs[ref]) if ref and "ours" in probs else {}
    refp = probs[ref] if ref else probs["ours"]
    top2 = np.sort(refp, 1)[:, -2:]
    cpu = C.cpu_info()
    res = {
        "benchmark": "predict_throughput", "model": args.model, "input_size": args.input_size,
        "batch_size": args.batch_size, "rounds": args.rounds, "images": source, "n_images": int(len(images)), "bundle": args.bundle,
        "prepare_seconds": prep_s, "prepare": prep_info, "cpu": cpu, "peak": peak, "torch": torch.__version__,
        "forward_gflops_per_image": fwd / 1e9, **made,
        "ways": rows, "naive": rows.get("naive"), "ours": rows.get("ours"),
        "ratio": rows["ours"].get("ratio", float("nan")) if "ours" in rows else float("nan"),
        "agreement": {"reference": ref, **agreement},
        "distinct_classes_predicted": int(len(np.unique(refp.argmax(1)))),
        "median_top1_top2_margin": float(np.median(top2[:, 1] - top2[:, 0])),
        "onnx_export_seconds": infos.get("onnx", {}).get("export_seconds"),
        "compile_seconds": warm.get("compiled"),
        "command": "python benchmarks/predict_throughput.py " + " ".join(sys.argv[1:]),
    }
    return res


def report(res: dict) -> str:
    cols = ["way", "cells_per_s", "ratio", "agree_naive", "n_agree_naive", "max_dp_naive", "bf16", "rechecked",
            "channels_last",
            "tcmalloc", "threads", "achieved_gflops", "util_fp32_peak", "util_own_peak"]
    a = res["agreement"]
    lines = [f"inference throughput: {res['model']} at {res['input_size']}px, batch {res['batch_size']}, "
             f"median of {res['rounds']} interleaved rounds; images: {res['images']}",
             f"CPU: {res['cpu']['model']} ({res['cpu']['cpus']} CPUs); torch {res['torch']}; "
             f"{res['forward_gflops_per_image']:.2f} GFLOP/image; peak {res['peak']['fp32_tflops'] * 1000:.0f} GFLOP/s "
             f"fp32, {res['peak']['bf16_tflops'] * 1000:.0f} bf16 ({res['peak']['how']})",
             C.table(list(res["ways"].values()), cols),
             f"ratio ours/naive: {res['ratio']:.2f}x; ours vs {a.get('reference')} (fp32) over {a.get('n')} images: "
             f"class agreement {a.get('agreement', float('nan')):.4f}, max |dp| {a.get('max_abs_prob_diff', float('nan')):.3g}; "
             f"the model predicts {res['distinct_classes_predicted']} distinct classes, median top-1/top-2 margin "
             f"{res['median_top1_top2_margin']:.3g}"]
    chk = res.get("bf16_check") or {}
    if "recheck_fraction" in chk:
        lines.append(f"bf16 check on {chk['n']} calibration images (not timed): max |dp| {chk['max_abs_prob_diff']:.3g}, "
                     f"guard {chk['bf16_guard']:.3g}, {chk['recheck_fraction']:.0%} re-run in fp32, agreement "
                     f"{chk['agreement_bf16_alone']:.3f} bf16 alone / {chk['agreement_with_recheck']:.3f} with re-runs; "
                     f"training would {'switch bf16 on' if chk['inference_bf16'] else 'keep fp32 (' + chk['reason'] + ')'}")
    if res.get("prepare"):
        pr = res["prepare"]
        lines.append(f"preparation (once, not in the table): {' -> '.join(pr['pipeline'])}; scale: {pr['scale']} "
                     f"({pr['scale_seconds']:.1f}s); decode {pr['decode_cells_per_s']:.0f} cells/s, pipeline "
                     f"{pr['pipeline_cells_per_s']:.0f} cells/s")
    if res.get("onnx_export_seconds") is not None:
        lines.append(f"onnx export (once): {res['onnx_export_seconds']:.1f}s")
    if res.get("compile_seconds") is not None:
        lines.append(f"torch.compile (first batch, once per process): {res['compile_seconds']:.1f}s")
    note = C.peak_note([r[k] for r in res["ways"].values() for k in ("util_fp32_peak", "util_own_peak")])
    return "\n".join(lines + ([note] if note else []))


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds (median reported)")
    ap.add_argument("--images", type=int, default=64, help="images for the ours-vs-fp32 agreement")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                    help="what the bundle's inference_bf16 says (auto: the model's CPU default where the CPU has bf16)")
    ap.add_argument("--compile", action="store_true", help="add the fp32 torch.compile way (slow to compile)")
    ap.add_argument("--torch", action="store_true", help="add ours_torch: the one path with its PyTorch backend")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(WAYS), help="ways to leave out")
    ap.add_argument("--bundle", help="a trained bundle instead of the seeded model (its model and input size)")
    ap.add_argument("--calib", type=int, default=32,
                    help="with --bundle: images (not timed) for the bf16 check when the bundle has no guard")
    ap.add_argument("--data", help="images from this dataset (any reader layout) instead of the LMU sample")
    ap.add_argument("--split", help="with --data: a split file; only the images of --fold are used")
    ap.add_argument("--fold", type=int, default=0)
    args = C.finish(ap, argv, "tiny settings for tests: plain_cnn at 32 px, 1 round")
    return C.main_flow(args, worker_main, run, report,
                       dict(model="plain_cnn", input_size=32, batch_size=4, rounds=1, images=8))


if __name__ == "__main__":
    raise SystemExit(main())
