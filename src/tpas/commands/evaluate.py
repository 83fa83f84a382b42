"""``tpas eval``: metrics, answer.txt and an HTML report for one model on one evaluation split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpas.commands import add_bad_image_argument, add_device_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model: R@1/5/10, mAP, mINP (+ normal/anomaly), report.html, answer.txt",
        description="Encode the split's gallery and queries, rank by ITC, optionally re-rank with ITM and "
                    "post-process the query set; print and save metrics, write report.html and, for a "
                    "masked challenge set, answer.txt.")
    p.add_argument("--model", required=True, help="model directory (e.g. RUN/best) or a named model")
    add_split_arguments(p)
    p.add_argument("--rerank", type=int, default=0, help="ITM re-rank depth (e.g. 128; 0 = ITC only)")
    p.add_argument("--itm", default="logit", choices=("logit", "prob"), help="ITM score used in fusion")
    p.add_argument("--weight", type=float, default=None,
                   help="ITC weight in the fusion (default: the model's calibrated weight, else upstream 0.002)")
    add_post_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default runs/eval/<split>)")
    p.add_argument("--index", default=None, help="gallery index folder to reuse/build (default OUT/index)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoding batch")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--report-queries", type=int, default=24, help="queries shown in report.html")
    add_bad_image_argument(p)
    add_device_argument(p)
    p.set_defaults(func=run)


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    """``--data``, ``--format`` and ``--split``: the evaluation split (shared with ``tpas fuse``)."""
    p.add_argument("--data", required=True, help="dataset root (for a masked split: its folder, or a root holding "
                                                 "challenge/ or track4/)")
    p.add_argument("--format", default="pab", choices=("pab", "cuhk", "icfg", "rstp"))
    p.add_argument("--split", default="test", help="test | ucc | challenge | track4 (pab); test | val (tbps)")


def add_post_arguments(p: argparse.ArgumentParser) -> None:
    """``--post``, ``--post-option`` and ``--assume-one-to-one`` (shared with ``tpas fuse``)."""
    p.add_argument("--post", default="none", choices=("none", "sca", "assign", "one_to_one", "dual_softmax"),
                   help="query-set post-processing on the ranking's raw scores; valid only when one image answers "
                        "at most one query (PAB); refused when the answer key shows otherwise")
    p.add_argument("--post-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the post-processing, e.g. threshold=0.8 rule=margin tau=0.5 (sca), k=2 slack=1.0 "
                        "(assign), temperature=0.05, confidence=itm|itc (repeatable)")
    p.add_argument("--assume-one-to-one", action="store_true",
                   help="the protocol gives every query its own image (no warning for a gallery much larger than "
                        "the query set, e.g. with distractors)")


def parse_options(items: list[str]) -> dict:
    """``["threshold=0.8", "k=10"]`` -> ``{"threshold": 0.8, "k": 10}`` (numbers parsed as JSON)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--post-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    from tpas.data.datasets import load_eval
    from tpas.eval.run import run_eval
    from tpas.models import create_model

    evalset = load_eval(args.data, args.format, args.split, on_bad_image=args.on_bad_image)
    model = create_model(args.model, device=args.device)
    out = Path(args.out) if args.out else Path("runs") / "eval" / args.split
    result = run_eval(model, evalset, rerank=args.rerank, weight=args.weight, itm_mode=args.itm, post=args.post,
                      post_options=parse_options(args.post_option), out_dir=out, index_dir=args.index,
                      batch_size=args.batch_size, workers=args.workers, report_queries=args.report_queries,
                      assume_one_to_one=args.assume_one_to_one)
    print_result(result, f"all (rerank={args.rerank} post={args.post})")
    return 0


def print_result(result, label: str) -> None:
    """The metrics table (and the answer file's) and where every output went."""
    from tpas.eval.tables import FIGURES, by_group, markdown_table

    if result.metrics is not None:
        print(markdown_table(by_group(result.metrics, label), ("n", *FIGURES, "mAP@10"), first="queries"))
    if result.answer_metrics is not None:
        print(markdown_table(by_group(result.answer_metrics, "answer.txt"), ("n", "R@1", "R@5", "R@10", "mAP@10"),
                             first="queries"))
    for name, path in result.outputs.items():
        print(f"{name}: {path}")
