"""Dataset and scoring commands: ``check-data``, ``check-answer``, ``metrics``."""

from __future__ import annotations

import argparse
from pathlib import Path

from tpas.errors import DataError

SHOW = 20  # problems printed; the report file holds all of them


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-data", help="check a dataset's annotations and images before using it",
                       description="Parse every annotation file and decode every referenced image "
                                   "(in parallel); list every bad line, duplicate id, missing and corrupt "
                                   "file. Exit 1 if there is any.")
    p.add_argument("root", help="dataset root (PAB: holds annotation/ and train/; TBPS: holds the json and imgs/)")
    p.add_argument("--format", required=True, choices=("pab", "cuhk", "icfg", "rstp"))
    p.add_argument("--split", action="append", default=None,
                   help="split to check (repeatable; default: every split present). "
                        "pab: train, test, ucc, challenge; cuhk/rstp: train, val, test; icfg: train, test")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images (default 8)")
    p.add_argument("--report", default=None,
                   help="also write the full report (every problem) as JSON to this file")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("check-answer", help="validate a challenge answer.txt before submitting it",
                       description="Check line count, 10 distinct known gallery IDs a line, single spaces.")
    p.add_argument("answer", help="answer.txt")
    p.add_argument("--queries", required=True, help="the challenge query.json")
    p.add_argument("--gallery", required=True, help="the challenge gallery folder")
    p.set_defaults(func=cmd_check_answer)

    p = sub.add_parser("metrics", help="R@K, mAP, mINP of any queries x gallery score matrix",
                       description="Rows of the score matrix are queries, columns gallery items; "
                                   "a gallery item is a positive when its id equals the query's id.")
    p.add_argument("--scores", required=True, help=".npy score matrix [queries, gallery] (memory-mapped)")
    p.add_argument("--query-ids", required=True, help="text file, one match id per query line")
    p.add_argument("--gallery-ids", required=True, help="text file, one match id per gallery line")
    p.add_argument("--query-groups", default=None, help="text file, one group label per query (e.g. normal/anomaly)")
    p.add_argument("--ks", default="1,5,10", help="comma-separated K for R@K (default 1,5,10)")
    p.add_argument("--allow-no-positive", action="store_true",
                   help="count queries without any positive as misses instead of failing")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.set_defaults(func=cmd_metrics)


def cmd_check_data(args: argparse.Namespace) -> int:
    from tpas.data.check import check_dataset

    report = check_dataset(args.root, args.format, splits=args.split, workers=args.workers)
    print(report.summary(show=SHOW))
    if args.report:
        print(f"report written to {report.save(args.report)}")
    return 0 if report.ok else 1


def cmd_check_answer(args: argparse.Namespace) -> int:
    from tpas.data.submission import check_answer

    problems = check_answer(args.answer, args.queries, args.gallery)
    if not problems:
        print(f"{args.answer}: OK")
        return 0
    for line in problems[:SHOW]:
        print(line)
    if len(problems) > SHOW:
        print(f"... and {len(problems) - SHOW} more problems")
    print(f"{args.answer}: {len(problems)} problems")
    return 1


def read_lines(path: str) -> list[str]:
    """One non-empty id per line (trailing newline and \\r stripped); errors name the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", path) from None
    lines = [line.rstrip("\r") for line in text.splitlines()]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError("empty line (one id per line expected)", path, n)
    return lines


def cmd_metrics(args: argparse.Namespace) -> int:
    import numpy as np

    from tpas.eval.metrics import evaluate
    from tpas.eval.tables import FIGURES, by_group, markdown_table
    from tpas.utils.io import write_json

    try:
        scores = np.load(args.scores, mmap_mode="r")
    except FileNotFoundError:
        raise DataError("file not found", args.scores) from None
    except ValueError as exc:
        raise DataError(f"not a .npy array: {exc}", args.scores) from None
    query_ids, gallery_ids = read_lines(args.query_ids), read_lines(args.gallery_ids)
    groups = read_lines(args.query_groups) if args.query_groups else None
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    results = evaluate(scores, query_ids, gallery_ids, ks=ks, query_groups=groups,
                       allow_no_positive=args.allow_no_positive, progress=True)
    columns = ("n", *(f"R@{k}" for k in ks), *FIGURES[3:])
    print(markdown_table(by_group(results), columns, first="queries"))
    if args.json:
        write_json(args.json, results.to_dict())
        print(f"results written to {args.json}")
    return 0
