"""``leukoscope review PATH | --db FILE`` (serve), ``review export DB --out DIR``, ``review export-labels DB --out DIR``."""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from leukoscope.cli._common import check_out_dir, um_per_px_arg
from leukoscope.review import ReviewStore, export_differential, export_labels
from leukoscope.review.app import create_app, make_token, serve
from leukoscope.review.model_views import ModelViews

NAME = "review"
HELP = "review station: correct the calls of a screen/predict run in the browser, sign off, export"
DESCRIPTION = """\
Serve the review station (a local web application) over a run:

  leukoscope review SCREEN_OUT            a 'leukoscope screen' output folder (cells.csv + summary.json)
  leukoscope review PREDICTIONS.csv       a 'leukoscope predict' table (or a folder with predictions.csv)
  leukoscope review --db FILE             reopen a review database
  leukoscope review export DB --out DIR   the signed differential: differential.csv/.json + report.html
  leukoscope review export-labels DB --out DIR
                                          the reviewed cells as a labelled dataset (PNG crops + labels.csv)
                                          that 'leukoscope train', 'evaluate' and 'adapt' read

The first run creates PATH/review.sqlite (or --db FILE) with every cell's crop cut from the original
smear at its native resolution; later runs reopen it (a database of another run is refused). Every
decision is committed when it is made. The station answers on 127.0.0.1 only unless --host names
another address together with --allow-remote; then a random access token is printed once and required.

Keys: 1 NGS, 2 NGB, 3 LYT, 4 MON, 5 EOS, 6 BAS, 7 MYO, 8 MOB, 9 PMO, 0 PMB, q MYB, w MMZ, e LYA, r EBO,
t KSC; u unidentified, n not a leukocyte, a artefact. Arrows move, '.' jumps to the next unseen cell,
Enter shows the details, s goes to the sign-off form. Not for diagnostic use.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="*", metavar="PATH | export DB | export-labels DB",
                   help="the run to review, or an export action and its database")
    p.add_argument("--db", metavar="FILE", help="review database (default PATH/review.sqlite)")
    p.add_argument("--out", metavar="DIR", help="output folder of export / export-labels")
    p.add_argument("--round", type=int, metavar="N", help="export this signed round (default: the latest signed)")
    p.add_argument("--model", metavar="FILE", help="model file (for a predict table, or when the screen's model moved)")
    p.add_argument("--um-per-px", type=um_per_px_arg, metavar="X", help="scale of a predict table's images (µm/px)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback (then an access token is required)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--reviewer", help="name pre-filled as the reviewer (default: the login name)")


def _export(args, action: str) -> int:

    if len(args.target) != 2 or not args.out:
        raise ValueError(f"usage: leukoscope review {action} DB --out DIR")
    check_out_dir(args.out)
    with ReviewStore(args.target[1]) as store:
        if action == "export":
            paths = export_differential(store, args.out, args.round)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
        else:
            res = export_labels(store, args.out, args.round)
            left = ", ".join(f"{n} {lab}" for lab, n in res["left_out"].items())
            print(f"wrote {res['labels']}: {res['written']} reviewed cells; left out: {left}")
    return 0


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def run(args: argparse.Namespace) -> int:

    if args.target and args.target[0] in ("export", "export-labels"):
        return _export(args, args.target[0])
    if len(args.target) > 1:
        raise ValueError("give one PATH (a screen output folder or a predictions CSV)")
    loopback = _is_loopback(args.host)
    if not loopback and not args.allow_remote:
        raise ValueError(f"--host {args.host} would let other machines reach the review station; "
                         "add --allow-remote to do so (an access token is then required)")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
        try:
            s.bind((args.host, args.port))
        except OSError as exc:
            raise ValueError(f"cannot serve on {args.host}:{args.port} ({exc.strerror}); choose another --port") from None
    if args.target:
        extra = {"model": args.model, "um_per_px": args.um_per_px}
        store = ReviewStore.open_or_create(args.target[0], args.db, **{k: v for k, v in extra.items() if v is not None})
    elif args.db:
        store = ReviewStore(args.db)
    else:
        raise ValueError("give the run to review (PATH) or a review database (--db FILE)")
    token = None if loopback else make_token()
    views = ModelViews(store, args.model)
    # the first page needs scipy (the intervals) and the first detail view the model: load both now
    threading.Thread(target=lambda: (store.differential(), views.warm()), name="warm-up", daemon=True).start()
    app = create_app(store, token=token, views=views, reviewer=args.reviewer, loopback=loopback)
    prog = store.progress()
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/"
    print(f"review database {store.path}: {prog['cells']} cells, {prog['seen']} seen, "
          f"{prog['unidentified']} unidentified (round {store.current_round()['round']})")
    print(f"review station at {url}" + (f"?token={token}" if token else "") + "  (Ctrl+C to stop)")
    if token:
        print("the access token above is shown only once; anyone with it can change this review", file=sys.stderr)
    sys.stdout.flush()
    try:
        serve(app, args.host, args.port)
    finally:
        store.close()
    return 0
