"""``tpas fuse``: ensemble several systems on one split, then post-process, score and write like ``tpas eval``."""

from __future__ import annotations

import argparse
from pathlib import Path

from tpas.commands import add_device_argument
from tpas.commands.evaluate import add_post_arguments, add_split_arguments, parse_options, print_result


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fuse", help="ensemble several models / score matrices (min-max or reciprocal-rank fusion), then evaluate",
        description="Rank the split with every --system, fuse their [queries x gallery] scores (weighted min-max "
                    "over each whole matrix, or reciprocal-rank fusion), post-process the fused ranking and write "
                    "metrics.json, report.html and, for a masked set, answer.txt (answer.zip for Track 4).")
    add_split_arguments(p)
    p.add_argument("--system", action="append", required=True, metavar="SPEC",
                   help="a model directory or name, or SCORES.npy,QUERY_IDS.txt,GALLERY_IDS.txt (ids as tpas reads "
                        "them: query ids, gallery image ids); '@W' at the end sets its weight (default 1). Repeatable")
    p.add_argument("--method", default="rrf", choices=("rrf", "minmax"), help="fusion (default rrf)")
    p.add_argument("--rrf-k", type=float, default=60.0, help="RRF constant k (default 60)")
    p.add_argument("--rrf-depth", type=int, default=None, help="RRF: only each system's top-N count (default all)")
    p.add_argument("--rerank", type=int, default=0, help="ITM re-rank depth for model systems (rrf only; default 0)")
    add_post_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default runs/fuse/<split>)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoding batch")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    add_device_argument(p)
    p.set_defaults(func=run)


def parse_system(spec: str) -> tuple[str, list[str], float]:
    """``DIR@0.5`` -> ("model", [DIR], 0.5); ``S.npy,Q.txt,G.txt`` -> ("scores", [S, Q, G], 1.0)."""
    from tpas.errors import TpasError

    body, sep, weight = spec.rpartition("@")
    if not sep:
        body, weight = spec, "1"
    try:
        w = float(weight)
    except ValueError:
        raise TpasError(f"--system {spec!r}: the weight after '@' must be a number") from None
    parts = body.split(",")
    if len(parts) == 3 and parts[0].endswith(".npy"):
        return "scores", parts, w
    if len(parts) != 1 or not body:
        raise TpasError(f"--system {spec!r}: expected a model, or SCORES.npy,QUERY_IDS.txt,GALLERY_IDS.txt")
    return "model", parts, w


def run(args: argparse.Namespace) -> int:
    from tpas.data.datasets import load_eval
    from tpas.eval.fusion import external_system, model_system, run_fusion
    from tpas.models import create_model

    evalset = load_eval(args.data, args.format, args.split)
    out = Path(args.out) if args.out else Path("runs") / "fuse" / args.split
    systems, first_model = [], None
    for i, spec in enumerate(args.system):
        kind, parts, weight = parse_system(spec)
        if kind == "scores":
            systems.append(external_system(*parts, evalset, weight=weight))
            continue
        model = create_model(parts[0], device=args.device)
        if first_model is None:
            first_model = model
        systems.append(model_system(model, evalset, rerank=args.rerank, weight=weight, name=parts[0],
                                    index_dir=out / f"index-{i}", batch_size=args.batch_size, workers=args.workers))
    result = run_fusion(systems, evalset, method=args.method, k=args.rrf_k, rrf_depth=args.rrf_depth, post=args.post,
                        post_options=parse_options(args.post_option), model=first_model, out_dir=out,
                        assume_one_to_one=args.assume_one_to_one)
    print_result(result, f"fused {len(systems)} ({args.method}, post={args.post})")
    return 0
