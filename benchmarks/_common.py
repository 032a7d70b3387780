"""Shared parts of the benchmarks: worker processes, interleaving, FLOPs, hardware peak, tables.

The naive way and LeukoScope's way run in two (or more) worker processes that one parent
drives in turn, one repetition each, alternating (naive, ours, naive, ours, ...), so that
both see the same load on a shared machine. Separate processes are needed because the
memory allocator is chosen per process: the naive worker runs with the default glibc
allocator (``LD_PRELOAD`` cleared of tcmalloc), "ours" under tcmalloc when installed, as
the ``leukoscope`` command does (``leukoscope.cli.main``). Each worker reports whether
tcmalloc is really mapped into it.

Protocol: the parent writes one JSON line per command to the worker's stdin; the worker
answers one line ``@@{json}`` on stdout (anything else it prints goes to stderr).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LEUKOSCOPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
LMU_SAMPLE = SHARED / "aml_lmu_sample"
TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def tcmalloc_path() -> str | None:
    return next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)


def tcmalloc_loaded() -> bool:
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def worker_env(tcmalloc: bool) -> dict:
    """The environment of a worker: LD_PRELOAD without tcmalloc, plus tcmalloc when asked and installed."""
    env = dict(os.environ)
    keep = [p for p in env.get("LD_PRELOAD", "").split() if "tcmalloc" not in p]
    lib = tcmalloc_path() if tcmalloc else None
    if lib:
        keep.insert(0, lib)
    if keep:
        env["LD_PRELOAD"] = " ".join(keep)
    else:
        env.pop("LD_PRELOAD", None)
    env["LEUKOSCOPE_NO_TCMALLOC"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------- workers


class Worker:
    """A benchmark role in its own process: ``call(cmd, **args)`` -> the worker's JSON answer."""

    def __init__(self, script: str | Path, role: str, config: dict, tcmalloc: bool):
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", role, "--worker-config", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env(tcmalloc), cwd=str(ROOT))
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"benchmark worker {self.role!r} exited (code {self.proc.wait()}); see its stderr")
            if line.startswith("@@"):
                msg = json.loads(line[2:])
                if "error" in msg:
                    raise RuntimeError(f"benchmark worker {self.role!r} failed:\n{msg['error']}")
                return msg

    def call(self, cmd: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def serve(setup, handlers: dict) -> int:
    """Worker main: ``setup()`` -> ready info; then answer commands until ``quit``."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not mix with the protocol

    def send(obj):
        out.write("@@" + json.dumps(obj) + "\n")
        out.flush()

    try:
        info = setup() or {}
        info.update({"pid": os.getpid(), "tcmalloc": tcmalloc_loaded()})
        send(info)
    except Exception:
        send({"error": traceback.format_exc()})
        return 1
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            send(handlers[msg["cmd"]](**msg.get("args", {})))
        except Exception:
            send({"error": traceback.format_exc()})
    return 0


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------- hardware and FLOPs


def cpu_info() -> dict:
    """Model name, logical CPUs usable by this process, MHz and the SIMD flags that set the peak."""
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = (s.strip() for s in line.split(":", 1))
            fields.setdefault(k, v)
    flags = set(fields.get("flags", "").split())
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    mhz = float(fields.get("cpu MHz", 0) or 0) or None
    return {"model": fields.get("model name", platform.processor() or "unknown"), "vendor": fields.get("vendor_id"),
            "family": fields.get("cpu family"), "cpus": n, "mhz": mhz,
            "flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})}


def cpu_peak(info: dict | None = None) -> dict:
    """Estimated dense peak FLOP/s (fp32 and bf16) = cores x clock x FLOP/cycle from the SIMD flags.

    FLOP/cycle/core for fp32: 2 FMA pipes x lanes x 2. AVX-512 on AMD Zen 4 (family 25) runs on
    256-bit pipes, so it counts as AVX2 width there. bf16: AMX tiles 1024 FLOP/cycle; AVX512-BF16
    dot products twice the fp32 rate; otherwise bf16 is no faster than fp32.
    """
    info = info or cpu_info()
    flags = set(info["flags"])
    zen4 = info.get("vendor") == "AuthenticAMD" and str(info.get("family")) == "25"
    if "avx512f" in flags and not zen4:
        fp32, simd = 64, "AVX-512 (2 x 16 fp32 FMA)"
    elif "avx512f" in flags or "avx2" in flags and "fma" in flags:
        fp32, simd = 32, "AVX2-width FMA (2 x 8 fp32)" + (" (Zen 4 AVX-512 is double-pumped 256-bit)" if zen4 else "")
    else:
        fp32, simd = 8, "SSE"
    if "amx_bf16" in flags:
        bf16, bsimd = 1024, "AMX-BF16"
    elif "avx512_bf16" in flags:
        bf16, bsimd = 2 * fp32, "AVX512-BF16 (2x fp32)"
    else:
        bf16, bsimd = fp32, "no bf16 units (bf16 = fp32 rate)"
    ghz = (info.get("mhz") or 2000.0) / 1000
    return {"fp32_tflops": info["cpus"] * ghz * fp32 / 1000, "bf16_tflops": info["cpus"] * ghz * bf16 / 1000,
            "how": f"{info['cpus']} cores x {ghz:.2f} GHz x {fp32} fp32 FLOP/cycle [{simd}]; bf16 {bf16} FLOP/cycle [{bsimd}]"}


def peak_note(utils) -> str:
    """A warning when a utilisation exceeds 1: the clock /proc/cpuinfo gives is below the running clock."""
    if any(u == u and u > 1 for u in utils):
        return ("note: utilisation above 1 means the cores run faster than the nominal clock in /proc/cpuinfo "
                "(turbo/boost; a VM does not report it): the peak is a floor and the fractions upper bounds; "
                "give --peak-tflops for the real figure")
    return ""


def forward_flops(model_name: str, input_size: int, num_classes: int = 15) -> float:
    """Forward FLOPs of one image (torch.utils.flop_counter on the meta device: no memory, no time)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from leukoscope.models.registry import create_model

    with torch.device("meta"):
        model = create_model(model_name, num_classes=num_classes, input_size=input_size).eval()
        x = torch.empty(1, 3, input_size, input_size)
        with FlopCounterMode(display=False) as fc:
            model(x)
    return float(fc.get_total_flops())


# --------------------------------------------------------------------------- images


def lmu_images(limit: int | None = None):
    """(paths, labels) of the real LMU sample TIFFs, or ([], []) when the folder is absent."""
    ann = LMU_SAMPLE / "annotations.dat"
    if not ann.exists():
        return [], []
    paths, labels = [], []
    for line in ann.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and (LMU_SAMPLE / parts[0]).exists():
            paths.append(str(LMU_SAMPLE / parts[0]))
            labels.append(parts[1])
    paths, labels = paths[:limit], labels[:limit]
    return paths, labels


def synthetic_cells(n: int, size: int = 400, seed: int = 0, out_dir: str | None = None):
    """``n`` synthetic cells (classes in turn) as TIFF files like LMU's: (paths, labels)."""
    from PIL import Image

    from leukoscope import taxonomy
    from leukoscope.synth import make_cell

    out = Path(out_dir or tempfile.mkdtemp(prefix="leukoscope_bench_"))
    paths, labels = [], []
    for i in range(n):
        cls = taxonomy.CLASSES[i % len(taxonomy.CLASSES)]
        p = out / f"{cls}_{i:04d}.tiff"
        if not p.exists():
            Image.fromarray(make_cell(cls, seed=seed * 100_003 + i, size=size)).save(p)
        paths.append(str(p))
        labels.append(cls)
    return paths, labels


def image_source(n_min: int, synthetic: bool = False, tmp: str | None = None):
    """Real LMU TIFFs when present (topped up with synthetic cells to ``n_min``), else synthetic: (paths, labels, note)."""
    paths, labels = ([], []) if synthetic else lmu_images()
    note = f"{len(paths)} real LMU TIFFs ({LMU_SAMPLE})" if paths else (
        "synthetic cells (asked for)" if synthetic else f"real LMU sample absent ({LMU_SAMPLE}): synthetic cells")
    if len(paths) < n_min:
        sp, sl = synthetic_cells(n_min - len(paths), out_dir=tmp)
        if paths:
            note += f" + {len(sp)} synthetic cells"
        paths, labels = paths + sp, labels + sl
    return paths, labels, note


# --------------------------------------------------------------------------- output


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_json(obj: dict, path: str | os.PathLike | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def parser(doc: str, batch_size: int = 8):
    """The arguments every CPU benchmark shares (model, size, batch); add yours, then :func:`finish`."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnext50_32x4d")
    ap.add_argument("--input-size", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    return ap


def finish(ap, argv, smoke_help: str):
    """Add the shared run options, parse; ``(args, is_worker)``."""
    import argparse

    ap.add_argument("--synthetic", action="store_true", help="synthetic cells instead of the real LMU TIFFs")
    ap.add_argument("--no-tcmalloc", action="store_true", help="ours without tcmalloc")
    ap.add_argument("--peak-tflops", type=float, help="hardware peak to use instead of the /proc/cpuinfo estimate")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main_flow(args, worker_main, run, report, smoke: dict) -> int:
    """A benchmark's entry: serve as a worker, or (with ``smoke`` settings under --smoke) run, print, save."""
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_config))
    if args.smoke:
        for k, v in smoke.items():
            setattr(args, k, v)
    res = run(args)
    print(report(res))
    write_json(res, args.json)
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
