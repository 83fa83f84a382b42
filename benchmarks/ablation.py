"""Ablation of the retrieval pipeline on mini-PAB: ITC, + ITM re-rank, + SCA / one-to-one / dual-softmax.

For each split (default: test; mini-PAB's challenge set holds the same people, shuffled) the gallery
is indexed once, ITC and re-ranked scores are computed once, and every post-processing runs on
the re-ranked scores. Rows: R@1/5/10, mAP, mINP overall and per behaviour (normal / anomaly).

SCA and its relatives assume that one gallery image answers at most one query; the script
reports how many queries share a target in each split, since mini-PAB's splits have several
captions per image (the assumption then fails and these methods may hurt).

    .venv/bin/python benchmarks/ablation.py --model RUN/best --data MINIPAB
    .venv/bin/python benchmarks/ablation.py --model lite --data MINIPAB --rerank 32 --splits challenge

Prints markdown tables and saves ``benchmarks/results/ablation.{json,md}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from common import RESULTS, save_results

from tpas.data.datasets import load_eval
from tpas.eval.run import run_eval
from tpas.eval.tables import FIGURES, markdown_table
from tpas.models import create_model
from tpas.search.ranking import DEFAULT_WEIGHT, rank_evalset, resolve_weight

COLUMNS = (*FIGURES, "normal R@1", "normal mAP", "anomaly R@1", "anomaly mAP")


def rows_for(args) -> list[tuple[str, bool | str, str, dict]]:
    """(label, use re-rank (True, or "upstream" for the 0.002 fusion weight), post method, options)."""
    return [
        ("ITC only", False, "none", {}),
        ("ITC + SCA", False, "sca", {"threshold": args.sca_threshold}),
        (f"+ ITM re-rank (top {args.rerank}, upstream w={DEFAULT_WEIGHT})", "upstream", "none", {}),
        (f"+ ITM re-rank (top {args.rerank}, w={args.weight:g})", True, "none", {}),
        ("+ ITM + SCA", True, "sca", {"threshold": args.sca_threshold}),
        (f"+ ITM + one-to-one (k={args.o2o_k})", True, "one_to_one", {"k": args.o2o_k}),
        (f"+ ITM + dual-softmax (T={args.temperature})", True, "dual_softmax", {"temperature": args.temperature}),
    ]


def run_split(model, args, split: str, work: Path) -> dict:
    """Rank the split once per (re-rank, weight) and evaluate every row through ``run_eval``."""
    evalset = load_eval(args.data, "pab", split)
    if not evalset.has_ground_truth:
        raise SystemExit(f"{split}: no ground truth (attach challenge/answer_key.json)")
    per_target = Counter(evalset.query_targets())
    t0 = time.perf_counter()
    index_dir = work / split / "index"
    rankings = {False: rank_evalset(model, evalset, index_dir=index_dir, batch_size=args.batch_size),
                True: rank_evalset(model, evalset, rerank=args.rerank, weight=args.weight, index_dir=index_dir)}
    rankings["upstream"] = rankings[True]
    if args.weight != DEFAULT_WEIGHT:
        rankings["upstream"] = rank_evalset(model, evalset, rerank=args.rerank, weight=DEFAULT_WEIGHT,
                                            index_dir=index_dir)
    scoring_s = time.perf_counter() - t0
    results = []
    for label, use_rerank, post, options in rows_for(args):
        result = run_eval(model, evalset, post=post, post_options=options, ranking=rankings[use_rerank],
                          progress=False)
        results.append({"setting": label, "rerank": result.settings["rerank"],
                        "fusion_weight": result.settings["fusion_weight"], "post": post, "options": options,
                        "metrics": result.metrics.to_dict(), "post_seconds": round(result.timings["post_s"], 3)})
    return {"split": split, "eval_set": evalset.name, "queries": len(evalset.queries), "gallery": len(evalset.gallery),
            "max_queries_per_image": max(per_target.values()),
            "images_with_several_queries": sum(1 for c in per_target.values() if c > 1),
            "scoring_seconds": round(scoring_s, 1), "rows": results}


def markdown(split: dict) -> str:
    from tpas.eval.metrics import Metrics

    rows = [(r["setting"], Metrics.from_dict(r["metrics"])) for r in split["rows"]]
    return (f"### {split['split']} ({split['eval_set']}): {split['queries']} queries, {split['gallery']} images\n\n"
            f"{split['images_with_several_queries']} images are the target of more than one query "
            f"(up to {split['max_queries_per_image']}); SCA / one-to-one / dual-softmax assume one.\n\n"
            + markdown_table(rows, COLUMNS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained model directory (RUN/best) or a named model")
    ap.add_argument("--data", required=True, help="mini-PAB root")
    ap.add_argument("--splits", nargs="+", default=["test"], help="test, ucc, challenge (needs its answer key)")
    ap.add_argument("--rerank", type=int, default=128)
    ap.add_argument("--weight", type=float, default=None,
                    help="ITC weight in the fusion (default: the model's validation-calibrated weight, else 0.002)")
    ap.add_argument("--sca-threshold", type=float, default=0.0, help="text cosine threshold (0 = all queries)")
    ap.add_argument("--o2o-k", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="a line printed above the tables (e.g. which model this is)")
    ap.add_argument("--out", default=str(RESULTS / "ablation"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model).eval()
    args.weight = resolve_weight(model, args.weight)
    with tempfile.TemporaryDirectory(prefix="tpas-ablation-") as tmp:
        splits = [run_split(model, args, split, Path(tmp)) for split in args.splits]
    header = (f"## Retrieval ablation\n\nmodel `{args.model}`, data `{args.data}`, ITM = logit, fusion weight {args.weight:g} "
              f"(per-query min-max; upstream's {DEFAULT_WEIGHT} in its own row), SCA threshold {args.sca_threshold}.\n")
    if args.note:
        header += f"\n{args.note}\n"
    text = header + "\n" + "\n".join(markdown(s) for s in splits)
    print(text)
    dest = Path(args.out)
    save_results(dest, {"model": args.model, "data": str(args.data), "note": args.note, "splits": splits}, text)


if __name__ == "__main__":
    main()
