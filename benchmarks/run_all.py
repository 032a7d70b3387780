"""Run the CPU benchmarks in sequence and print one summary table (``make bench``).

    python benchmarks/run_all.py [--out benchmarks/results] [--smoke] [--only train predict train_fast predict_trained]

Each benchmark runs as its own command (the one printed beside its row), writes its JSON into
``--out`` and prints its own table; the summary at the end gathers naive, ours, the ratio, class
agreement and the fraction of the CPU's arithmetic peak. About 15 minutes on a 2-core CPU.
``predict_trained`` needs the fixture of ``trained_resnext.py`` in runs/resnext400bn (skipped, saying so, without it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

#: name -> (script, arguments)
BENCHMARKS = {
    "train": ("train_throughput.py", []),
    "train_fast": ("train_throughput.py", ["--model", "mobilenet_v3_small", "--input-size", "128",
                                           "--batch-size", "64", "--steps", "5"]),
    "predict": ("predict_throughput.py", []),
    # the trained fixture of trained_resnext.py on held-out PBC cells: equal predictions can be judged
    "predict_trained": ("predict_throughput.py", ["--bundle", str(ROOT / "runs" / "resnext400bn" / "model.safetensors"),
                                                  "--data", str(ROOT.parent / "shared" / "data" / "pbc"),
                                                  "--split", str(ROOT / "runs" / "rob" / "pbc_split.csv"),
                                                  "--fold", "0", "--images", "200", "--rounds", "5"]),
}
#: what a benchmark needs besides the repository (skipped, with the reason, when absent)
REQUIRES = {"predict_trained": [ROOT / "runs" / "resnext400bn" / "model.safetensors",
                                ROOT / "runs" / "rob" / "pbc_split.csv", ROOT.parent / "shared" / "data" / "pbc"]}


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for name, res in results.items():
        if res.get("benchmark") == "train_throughput":
            unit, key = "images/s", "images_per_s"
        else:
            unit, key = "cells/s", "cells_per_s"
        n, o = res["naive"], res["ours"]
        row = {"benchmark": name, "model": f"{res['model']} {res['input_size']}px b{res['batch_size']}",
               "unit": unit, "naive": n[key], "ours": o[key], "ratio": res["ratio"],
               "agreement": "n/a (training)", "naive_%peak": 100 * n["util_fp32_peak"],
               "ours_%fp32_peak": 100 * o["util_fp32_peak"], "ours_%own_peak": 100 * o["util_own_peak"]}
        if "agreement" in res:
            a = res["agreement"]
            row["agreement"] = (f"{o.get('agree_naive', float('nan')):.3f} vs naive (n={o.get('n_agree_naive')}), "
                                f"{a.get('agreement', float('nan')):.3f} vs {a.get('reference')} (n={a.get('n')})")
        rows.append(row)
        for w, r in res.get("ways", {}).items():
            if w in ("naive", "ours"):
                continue
            rows.append({"benchmark": f"{name}:{w}", "model": row["model"], "unit": unit, "naive": n[key],
                         "ours": r[key], "ratio": r["ratio"],
                         "agreement": f"{r.get('agree_naive', float('nan')):.3f} vs naive (n={r.get('n_agree_naive')})",
                         "naive_%peak": 100 * n["util_fp32_peak"], "ours_%fp32_peak": 100 * r["util_fp32_peak"],
                         "ours_%own_peak": 100 * r["util_own_peak"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--smoke", action="store_true", help="each benchmark's tiny smoke mode")
    ap.add_argument("--only", nargs="*", choices=list(BENCHMARKS))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (script, extra) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        if args.smoke and name in ("train_fast", "predict_trained"):
            continue
        missing = [str(r) for r in REQUIRES.get(name, []) if not r.exists()]
        if missing:
            print(f"skipping {name}: {', '.join(missing)} not found (see benchmarks/trained_resnext.py)\n", flush=True)
            continue
        cmd = [sys.executable, str(HERE / script), *extra, *(["--smoke"] if args.smoke else []),
               "--json", str(out / f"{name}.json")]
        print(f"$ {' '.join(cmd)}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        print(f"({time.time() - t0:.0f}s)\n", flush=True)
        results[name] = json.loads((out / f"{name}.json").read_text())
    rows = summary_rows(results)
    cpu = C.cpu_info()
    print(f"summary ({cpu['model']}, {cpu['cpus']} CPUs, flags {' '.join(cpu['flags'])}):")
    print(C.table(rows, ["benchmark", "model", "unit", "naive", "ours", "ratio", "agreement", "naive_%peak",
                         "ours_%fp32_peak", "ours_%own_peak"]))
    C.write_json({"rows": rows, "cpu": cpu}, out / "summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
