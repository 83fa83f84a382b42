"""Dataset and scoring commands: ``check-data``, ``check-answer``, ``metrics``."""

from __future__ import annotations

import argparse
from pathlib import Path

from tpas.errors import DataError, TpasError

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

    p = sub.add_parser("check-answer", help="validate an answer.txt (or Track 4 answer.zip) before submitting it",
                       description="Check line count, 10 distinct known gallery IDs a line, single spaces; for a "
                                   "zip, that it holds answer.txt only. Works for the WWW'25 challenge (query.json) "
                                   "and AICity'26 Track 4 (query_index.txt).")
    p.add_argument("answer", help="answer.txt or answer.zip")
    p.add_argument("--data", help="the masked set's folder (holds query.json or query_index.txt, and gallery/), "
                                  "or a mini-PAB root holding challenge/ or track4/")
    p.add_argument("--queries", help="query.json (WWW'25) or query_index.txt (Track 4), instead of --data")
    p.add_argument("--gallery", help="the gallery folder, instead of --data")
    p.set_defaults(func=cmd_check_answer)

    p = sub.add_parser("metrics", help="R@K, mAP, mINP, mAP@10 of a score matrix, or of an answer file",
                       description="Either a score matrix (rows are queries, columns gallery items; a gallery "
                                   "item is a positive when its id equals the query's id), or an answer file "
                                   "scored against a masked set's answer_key.json: R@1/5/10 and mAP@10, as the "
                                   "AICity'26 Track 4 leaderboard computes it.")
    p.add_argument("--answer", help="answer.txt or answer.zip to score (with --data)")
    p.add_argument("--data", help="the masked set holding answer_key.json (with --answer)")
    p.add_argument("--scores", help=".npy score matrix [queries, gallery] (memory-mapped)")
    p.add_argument("--query-ids", help="text file, one match id per query line")
    p.add_argument("--gallery-ids", help="text file, one match id per gallery line")
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


def masked_set_files(data: str) -> tuple[Path, Path]:
    """(query file, gallery folder) of a masked set: WWW'25 (query.json) or Track 4 (query_index.txt)."""
    from tpas.data.datasets import challenge_root, track4_root
    from tpas.data.pab import TRACK4_INDEX

    track4 = track4_root(data)
    if (track4 / TRACK4_INDEX).is_file():
        return track4 / TRACK4_INDEX, track4 / "gallery"
    challenge = challenge_root(data)
    if (challenge / "query.json").is_file():
        return challenge / "query.json", challenge / "gallery"
    raise DataError(f"no query.json or {TRACK4_INDEX} here (nor under challenge/ or track4/)", data)


def cmd_check_answer(args: argparse.Namespace) -> int:
    from tpas.data.submission import check_answer

    if args.data:
        queries, gallery = masked_set_files(args.data)
    elif args.queries and args.gallery:
        queries, gallery = args.queries, args.gallery
    else:
        raise TpasError("give --data (the masked set's folder), or both --queries and --gallery")
    problems = check_answer(args.answer, queries, gallery)
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


def answer_metrics(answer: str, data: str, ks: tuple[int, ...]):
    """R@K and mAP@10 of an answer file against the masked set's ``answer_key.json``."""
    from tpas.data.datasets import load_eval
    from tpas.data.submission import read_answer
    from tpas.eval.metrics import evaluate_rankings

    queries, _ = masked_set_files(data)
    split = "track4" if queries.suffix == ".txt" else "challenge"
    evalset = load_eval(queries.parent, "pab", split, check_images=False)
    if not evalset.has_ground_truth:
        raise DataError("no answer_key.json beside the queries: nothing to score against", queries.parent)
    rankings = read_answer(answer)
    if len(rankings) != len(evalset.queries):
        raise DataError(f"{len(rankings)} lines for {len(evalset.queries)} queries (run tpas check-answer)", answer)
    groups = evalset.query_groups()
    return evaluate_rankings(rankings, evalset.query_targets(), {g.image_id: g.target for g in evalset.gallery},
                             ks=ks, query_groups=groups if any(g != "unknown" for g in groups) else None,
                             ap_ks=(10,))


def cmd_metrics(args: argparse.Namespace) -> int:
    import numpy as np

    from tpas.eval.metrics import evaluate
    from tpas.eval.tables import FIGURES, by_group, markdown_table
    from tpas.utils.io import write_json

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    if args.answer or args.data:
        if not (args.answer and args.data):
            raise TpasError("scoring an answer file needs both --answer and --data")
        results = answer_metrics(args.answer, args.data, ks)
        print(markdown_table(by_group(results), ("n", *(f"R@{k}" for k in ks), "mAP@10"), first="queries"))
        if args.json:
            write_json(args.json, results.to_dict())
            print(f"results written to {args.json}")
        return 0
    if not (args.scores and args.query_ids and args.gallery_ids):
        raise TpasError("give --scores, --query-ids and --gallery-ids (or --answer and --data)")

    try:
        scores = np.load(args.scores, mmap_mode="r")
    except FileNotFoundError:
        raise DataError("file not found", args.scores) from None
    except ValueError as exc:
        raise DataError(f"not a .npy array: {exc}", args.scores) from None
    query_ids, gallery_ids = read_lines(args.query_ids), read_lines(args.gallery_ids)
    groups = read_lines(args.query_groups) if args.query_groups else None
    results = evaluate(scores, query_ids, gallery_ids, ks=ks, query_groups=groups,
                       allow_no_positive=args.allow_no_positive, progress=True, ap_ks=(10,))
    columns = ("n", *(f"R@{k}" for k in ks), *FIGURES[3:], "mAP@10")
    print(markdown_table(by_group(results), columns, first="queries"))
    if args.json:
        write_json(args.json, results.to_dict())
        print(f"results written to {args.json}")
    return 0
