"""Ablation of the retrieval pipeline on mini-PAB, one query per image (1:1) and with distractors.

Rows, each on the same rankings: ITC; + ITM re-rank of the top-k (the model's fusion weight);
+ SCA (the seed rule: the lower raw ITM confidence moves, look-alike descriptions only); + SCA's
margin rule (the query that loses least by moving moves); + global assignment (per collision
component, each query's top-2 plus a slack that keeps its top-1); one-to-one (no slack, top-10,
for reference); + fusion of two trained models (reciprocal-rank fusion of their re-ranked
orders); + fusion + global assignment.

Protocols: ``test`` = the mini-PAB test split (every caption has its own image); ``track4`` = the
AICity'26 Track 4-style masked copy written by ``tpas synth --distractors N`` (the same queries
against a gallery that adds both images of N people who are in no query; scored with its
answer key). Post-processing reads the rankings' raw scores (``tpas.search.postprocess``).

Nothing is chosen on a test split. SCA's text threshold, the margin rule's tau and the slack
prices are picked on validation identities carved out of the *training* split exactly as
training carves them (``--val-identities``, ``--val-seed`` = the run's ``data.val_identities``
and ``train.seed``; both models must have been trained with those, so that neither saw them):
``tpas.search.calibrate.calibrate_post`` over a grid, together with the raw score each method
compares (``confidence``: the head's raw ITM, raw ITC, or the ranking's fusion with one scale for
all queries). Tau and slack grids are multiples of the median top-1 - top-2 gap of the validation
confidences, so they follow the score's units (ITM logits, ITM margins, RRF values) whatever the
model.

    .venv/bin/python benchmarks/ablation.py --model RUN/best --second-model RUN2/best --data MINIPAB
    .venv/bin/python benchmarks/ablation.py --model runs/demo/model --data runs/demo/minipab --protocols test

Prints markdown tables and saves ``benchmarks/results/ablation.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, save_results

from tpas.data.datasets import load_eval, load_train
from tpas.data.loader import split_by_identity, validation_set
from tpas.eval.fusion import System, fuse_systems
from tpas.eval.metrics import Metrics
from tpas.eval.run import run_eval
from tpas.eval.tables import markdown_table
from tpas.models import create_model
from tpas.search.calibrate import CONFIDENCES, THRESHOLD_GRID, gap_grid, pick_post
from tpas.search.ranking import Ranking, rank_evalset, ranking_from_scores

COLUMNS = ("R@1", "R@5", "R@10", "mAP", "mAP@10", "normal R@1", "anomaly R@1")
PROTOCOL_SPLITS = {"test": "test", "track4": "track4"}


def fused(first: Ranking, second: Ranking) -> Ranking:
    """Reciprocal-rank fusion of two models' full orders (re-ranked heads included)."""
    return fuse_systems([System("first", first.score_matrix(), comparable=False, text_embeds=first.text_embeds),
                         System("second", second.score_matrix(), comparable=False)], "rrf", depth=10)


def rank_pair(models, evalset, rerank: int, work: Path) -> list[Ranking]:
    """Each model's ranking of ``evalset`` with its top-``rerank`` re-scored by ITM."""
    return [rank_evalset(m, evalset, rerank=rerank, depth=max(rerank, 10), index_dir=work / f"index-{i}",
                         progress=False) for i, m in enumerate(models)]


def pick(ranking: Ranking, targets, method: str, option: str, grid_for, conservative: str,
         confidences=CONFIDENCES, **fixed) -> dict:
    """:func:`tpas.search.calibrate.pick_post` on a validation ranking and its (query, gallery) targets."""
    return pick_post(ranking, *targets, method, option, grid_for, conservative, confidences, **fixed)


def calibrate(models, args, work: Path) -> dict:
    """Pick every post-processing knob on the validation identities (never the test split)."""
    train = load_train(args.data, "pab")
    _, val_pairs = split_by_identity(train.pairs, args.val_identities, args.val_seed)
    valset = validation_set(val_pairs, train.root, args.val_max_queries)
    targets = (valset.query_targets(), valset.gallery_targets())
    rankings = rank_pair(models, valset, args.rerank, work / "val")
    first = rankings[0]

    def gaps(ranking):
        return lambda conf: gap_grid(ranking, conf)

    knobs = {"val_queries": len(valset.queries), "val_gallery": len(valset.gallery)}
    knobs["threshold"] = pick(first, targets, "sca", "threshold", lambda conf: THRESHOLD_GRID, "max")
    sca_fixed = {"threshold": knobs["threshold"]["value"], "rule": "margin"}
    knobs["tau"] = pick(first, targets, "sca", "tau", lambda conf: (0.0, *gaps(first)(conf)), "max", **sca_fixed)
    knobs["slack"] = pick(first, targets, "assign", "slack", gaps(first), "min", k=2)
    if len(rankings) > 1:
        both = fused(*rankings)
        knobs["fused_slack"] = pick(both, targets, "assign", "slack", gaps(both), "min", confidences=("itc",), k=2)
    return knobs


def rows_for(args, knobs: dict, two: bool) -> list[tuple[str, str, str, dict]]:
    """(label, which ranking, post method, options)."""
    thr, tau, slack = knobs["threshold"], knobs["tau"], knobs["slack"]
    rows = [
        ("ITC", "itc", "none", {}),
        (f"+ ITM re-rank top-{args.rerank}", "first", "none", {}),
        (f"+ SCA (seed rule; {thr['confidence']}, text threshold {thr['value']:g})", "first", "sca",
         {"threshold": thr["value"], "confidence": thr["confidence"]}),
        (f"+ SCA (margin rule; {tau['confidence']}, tau {tau['value']:.3g})", "first", "sca",
         {"threshold": thr["value"], "rule": "margin", "tau": tau["value"], "confidence": tau["confidence"]}),
        (f"+ global assignment (top-2; {slack['confidence']}, slack {slack['value']:.3g})", "first", "assign",
         {"k": 2, "slack": slack["value"], "confidence": slack["confidence"]}),
        ("one-to-one (top-10, no slack; itm)", "first", "one_to_one", {"k": 10}),
    ]
    if two:
        rows += [
            ("+ fusion of two models (RRF, k = 60)", "fused", "none", {}),
            (f"+ fusion + global assignment (slack {knobs['fused_slack']['value']:.3g})", "fused", "assign",
             {"k": 2, "slack": knobs["fused_slack"]["value"]}),
        ]
    return rows


def run_protocol(models, args, knobs: dict, protocol: str, work: Path) -> dict:
    """Rank once per model, then evaluate every row through run_eval on those rankings."""
    evalset = load_eval(args.data, "pab", PROTOCOL_SPLITS[protocol])
    if not evalset.has_ground_truth:
        raise SystemExit(f"{protocol}: no ground truth (its answer_key.json is missing)")
    t0 = time.perf_counter()
    rankings = rank_pair(models, evalset, args.rerank, work / protocol)
    first = rankings[0]
    by_name = {"first": first, "itc": ranking_from_scores(first.itc_scores, depth=10, text_embeds=first.text_embeds)}
    if len(rankings) > 1:
        by_name["fused"] = fused(*rankings)
    ranking_s = time.perf_counter() - t0
    rows = []
    for label, which, post, options in rows_for(args, knobs, len(models) > 1):
        res = run_eval(models[0], evalset, ranking=by_name[which], post=post, post_options=options,
                       assume_one_to_one=True, progress=False)
        rows.append({"setting": label, "ranking": which, "post": post, "options": res.settings["post_options"],
                     "metrics": res.metrics.to_dict(), "post_seconds": round(res.timings["post_s"], 3)})
    return {"protocol": protocol, "eval_set": evalset.name, "queries": len(evalset.queries),
            "gallery": len(evalset.gallery), "ranking_seconds": round(ranking_s, 1), "rows": rows}


def markdown(result: dict) -> str:
    rows = [(r["setting"], Metrics.from_dict(r["metrics"])) for r in result["rows"]]
    kind = "one query per image" if result["protocol"] == "test" else "with distractors (Track 4 style)"
    return (f"### {result['protocol']}: {kind} ({result['eval_set']}: {result['queries']} queries, "
            f"{result['gallery']} gallery images)\n\n" + markdown_table(rows, COLUMNS))


def calibration_markdown(knobs: dict) -> str:
    lines = [f"Picked on {knobs['val_queries']} validation queries / {knobs['val_gallery']} images "
             "(training identities held out by the run), with the raw score compared; R@1 in percent per value:", ""]
    for name in ("threshold", "tau", "slack", "fused_slack"):
        if name not in knobs:
            continue
        k = knobs[name]
        tables = "; ".join(f"{conf}: " + ", ".join(f"{v:g}: {r:.1f}" for v, r in table.items())
                           for conf, table in k["tables"].items())
        lines.append(f"- {name} = **{k['value']:g}** on {k['confidence']} (val R@1 {k['r1']:.1f}; {tables})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained model directory (RUN/best) or a named model")
    ap.add_argument("--second-model", default=None, help="a second trained model for the fusion rows")
    ap.add_argument("--data", required=True, help="mini-PAB root (with track4/ for the distractor protocol)")
    ap.add_argument("--protocols", nargs="+", default=["test", "track4"], choices=tuple(PROTOCOL_SPLITS))
    ap.add_argument("--rerank", type=int, default=16, help="ITM re-rank depth (default 16)")
    ap.add_argument("--val-identities", type=float, default=0.05, help="the run's data.val_identities (default 0.05)")
    ap.add_argument("--val-seed", type=int, default=42, help="the run's train.seed (default 42, minipab-lite's)")
    ap.add_argument("--val-max-queries", type=int, default=300, help="the run's data.val_max_queries (default 300)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="a line printed above the tables (e.g. which models these are)")
    ap.add_argument("--out", default=str(RESULTS / "ablation"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = [create_model(args.model).eval()]
    if args.second_model:
        models.append(create_model(args.second_model).eval())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tpas-ablation-") as tmp:
        knobs = calibrate(models, args, Path(tmp))
        results = [run_protocol(models, args, knobs, p, Path(tmp)) for p in args.protocols]
    header = (f"## Retrieval ablation: post-processing on raw scores, 1:1 and with distractors\n\n"
              f"model `{args.model}`" + (f", second model `{args.second_model}`" if args.second_model else "")
              + f", data `{args.data}`, ITM re-rank top-{args.rerank} (fusion weight "
              f"{models[0].config.rerank_weight}), {time.perf_counter() - started:.0f} s.\n")
    if args.note:
        header += f"\n{args.note}\n"
    text = header + "\n" + calibration_markdown(knobs) + "\n" + "\n".join(markdown(r) for r in results)
    print(text)
    save_results(Path(args.out), {"model": args.model, "second_model": args.second_model, "data": str(args.data),
                                  "rerank": args.rerank, "note": args.note, "calibration": knobs,
                                  "protocols": results}, text)


if __name__ == "__main__":
    main()
