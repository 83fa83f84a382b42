"""Ablation of the retrieval pipeline on mini-PAB, one query per image (1:1) and with distractors.

Rows, each on the same rankings: ITC; + ITM re-rank of the top-k (the model's fusion weight);
+ SCA (the seed rule: the lower raw confidence moves, look-alike descriptions only); + SCA's
margin rule (the query that loses least by moving moves); + global assignment (per collision
component, each query's top-k plus a slack that keeps its top-1; k, slack and compared score
picked on validation); the same at the published top-2; one-to-one (no slack, top-10, for
reference); + fusion of two trained models (reciprocal-rank fusion of their re-ranked orders);
+ fusion + global assignment.

Protocols: ``test`` = the mini-PAB test split (every caption has its own image); ``track4`` = the
AICity'26 Track 4-style masked copy written by ``tpas synth --distractors N`` (the same queries
against a gallery that adds both images of N people who are in no query; scored with its
answer key). Post-processing reads the rankings' raw scores (``tpas.search.postprocess``).

Nothing is chosen on a test split. SCA's text threshold, the margin rule's tau and the
assignment's depth and slack are picked on validation identities carved out of the *training*
split exactly as training carves them (``--val-identities``, ``--val-seed`` = the run's
``data.val_identities`` and ``train.seed``; both models must have been trained with those, so
that neither saw them), each together with the raw score it compares (``confidence``: the head's
raw ITM, raw ITC, or the ranking's fusion with one scale for all queries). Tau and slack grids are
multiples of the median top-1 - top-2 gap of the validation confidences, so they follow the
score's units whatever the model. Every setting must beat the untouched ranking by more than noise
(``tpas.search.calibrate.beats_doing_nothing``). Each protocol has its own mirror on those
identities: ``test`` is calibrated on all their captions against all their images (1:1);
``track4`` on the same captions in folds of people, each fold post-processed on its own against
all the images, so that a fold asks about the protocol's share of the gallery and the other people
are distractors (``distractor_folds``), where moving a query off a shared image is less often right.

    .venv/bin/python benchmarks/ablation.py --model RUN/best --second-model RUN2/best --data MINIPAB
    .venv/bin/python benchmarks/ablation.py --model runs/demo/model --data runs/demo/minipab --protocols test

Prints markdown tables and saves ``benchmarks/results/ablation.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, save_results

from tpas.data.datasets import load_eval, load_train
from tpas.data.loader import identity_group, split_by_identity, validation_set
from tpas.data.records import EvalSet
from tpas.eval.fusion import System, fuse_systems
from tpas.eval.metrics import Metrics
from tpas.eval.run import run_eval
from tpas.eval.tables import markdown_table
from tpas.models import create_model
from tpas.search.calibrate import calibrate_assign, calibrate_sca
from tpas.search.ranking import Ranking, rank_evalset

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


def validation(args) -> tuple[EvalSet, list[str]]:
    """The validation identities the run held out: every caption against all their images; and
    the person (identity group) each query belongs to."""
    train = load_train(args.data, "pab")
    _, val_pairs = split_by_identity(train.pairs, args.val_identities, args.val_seed)
    valset = validation_set(val_pairs, train.root, args.val_max_queries)
    return valset, [identity_group(p) for p in val_pairs[:len(valset.queries)]]


def distractor_folds(valset: EvalSet, people: list[str], queries_per_image: float, seed: int) -> list[np.ndarray]:
    """The validation queries cut into folds that each ask about ``queries_per_image`` of the gallery:
    each fold, post-processed on its own against every validation image, mirrors a protocol whose
    other images are people in no query. A person's captions stay in one fold."""
    groups: dict[str, list[int]] = {}
    for i, person in enumerate(people):
        groups.setdefault(person, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_folds = max(1, round(len(valset.queries) / (queries_per_image * len(valset.gallery))))
    return [np.array(sorted(i for group in order[f::n_folds] for i in group)) for f in range(n_folds)]


def calibrate(rankings: list[Ranking], valset: EvalSet, folds: list[np.ndarray] | None) -> dict:
    """Pick every post-processing knob on the validation rankings (never the test split)."""
    targets = (valset.query_targets(), valset.gallery_targets())
    first = rankings[0]
    knobs = {"val_queries": len(valset.queries), "val_gallery": len(valset.gallery),
             "folds": len(folds) if folds else 1}
    knobs["sca"] = calibrate_sca(first, *targets, folds=folds)[1]
    knobs["assign"] = calibrate_assign(first, *targets, folds=folds)[1]
    knobs["before"] = knobs["assign"]["before"]  # R@1 untouched
    if len(rankings) > 1:
        knobs["fused_assign"] = calibrate_assign(fused(*rankings), *targets, folds=folds)[1]
    return knobs


def rows_for(args, knobs: dict, two: bool) -> list[tuple[str, str, str, dict]]:
    """(label, which ranking, post method, options)."""
    seed, margin, assign = knobs["sca"]["seed"], knobs["sca"]["margin"], knobs["assign"]["options"]
    rows = [
        ("ITC", "itc", "none", {}),
        (f"+ ITM re-rank top-{args.rerank}", "first", "none", {}),
        (f"+ SCA (seed rule; {seed['confidence']}, text threshold {seed['value']:g})", "first", "sca",
         {"threshold": seed["value"], "rule": "score", "tau": 0.0, "confidence": seed["confidence"]}),
        (f"+ SCA (margin rule; {margin['confidence']}, text threshold {margin['threshold']:g}, tau "
         f"{margin['tau']:.3g})", "first", "sca",
         {"threshold": margin["threshold"], "rule": "margin", "tau": margin["tau"], "confidence": margin["confidence"]}),
        (f"+ global assignment (top-{assign['k']}; {assign['confidence']}, slack {assign['slack']:.3g})", "first",
         "assign", dict(assign)),
        ("+ global assignment, published setting (top-2; slack picked)", "first", "assign",
         {"k": 2, **best_at_depth(knobs["assign"], 2)}),
        (f"one-to-one (top-10, no slack; {assign['confidence']})", "first", "one_to_one",
         {"k": 10, "confidence": assign["confidence"]}),
    ]
    if two:
        fused_assign = knobs["fused_assign"]["options"]
        rows += [
            ("+ fusion of two models (RRF, k = 60)", "fused", "none", {}),
            (f"+ fusion + global assignment (top-{fused_assign['k']}, slack {fused_assign['slack']:.3g})", "fused",
             "assign", dict(fused_assign)),
        ]
    return rows


def best_at_depth(record: dict, k: int) -> dict:
    """The best (confidence, slack) of a :func:`calibrate_assign` record at one depth."""
    tables = record["tables"][k]
    confidence, slack = max(((c, v) for c, table in tables.items() for v in table),
                            key=lambda cv: (tables[cv[0]][cv[1]], -cv[1]))
    return {"confidence": confidence, "slack": slack}


def run_protocol(models, args, knobs: dict, protocol: str, evalset: EvalSet, work: Path) -> dict:
    """Rank ``evalset`` once per model, then evaluate every row through run_eval on those rankings
    (``knobs``: picked on this protocol's validation mirror)."""
    t0 = time.perf_counter()
    rankings = rank_pair(models, evalset, args.rerank, work / protocol)
    first = rankings[0]
    by_name = {"first": first, "itc": first.itc_only()}
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
            f"{result['gallery']} gallery images; settings picked on its validation mirror)\n\n"
            + markdown_table(rows, COLUMNS))


def calibration_markdown(protocol: str, knobs: dict) -> str:
    split = ("all of them at once (1:1)" if knobs["folds"] == 1 else
             f"in {knobs['folds']} folds of people, each fold's captions against all the images (the other "
             "people are distractors, as in this protocol)")
    lines = [f"**Settings for {protocol}**, picked on {knobs['val_queries']} validation captions / "
             f"{knobs['val_gallery']} images of training identities the run held out, post-processed {split}; "
             f"R@1 {knobs['before']:.1f} untouched. A setting must beat untouched by more than noise (sign test, "
             "2 sd). Best R@1 per choice:", ""]
    sca = knobs["sca"]
    lines.append(f"- SCA: **{sca['options']}** (seed rule {sca['seed']['r1']:.1f}, margin rule {sca['margin']['r1']:.1f}; "
                 "seed rule by threshold on its best score: "
                 + ", ".join(f"{v:g}: {r:.1f}" for v, r in sca["seed"]["tables"][sca["seed"]["confidence"]].items())
                 + "; margin rule by threshold: "
                 + ", ".join(f"{t:g}: {got['r1']:.1f}" for t, got in sca["margin"]["by_threshold"].items()) + ")")
    for key in ("assign", "fused_assign"):
        if key not in knobs:
            continue
        record = knobs[key]
        best = {k: max(r for table in tables.values() for r in table.values()) for k, tables in record["tables"].items()}
        lines.append(f"- {'fusion + ' if key == 'fused_assign' else ''}assignment: **{record['options']}** "
                     f"(R@1 {record['r1']:.1f}; best R@1 per depth k: "
                     + ", ".join(f"{k}: {r:.1f}" for k, r in best.items()) + ")")
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
    valset, people = validation(args)
    evalsets = {p: load_eval(args.data, "pab", PROTOCOL_SPLITS[p]) for p in args.protocols}
    for protocol, evalset in evalsets.items():
        if not evalset.has_ground_truth:
            raise SystemExit(f"{protocol}: no ground truth (its answer_key.json is missing)")
    with tempfile.TemporaryDirectory(prefix="tpas-ablation-") as tmp:
        val_rankings = rank_pair(models, valset, args.rerank, Path(tmp) / "val")
        knobs = {}
        for protocol, evalset in evalsets.items():
            ratio = len(evalset.queries) / max(1, len(evalset.gallery))
            folds = None if ratio >= 0.5 else distractor_folds(valset, people, ratio, args.val_seed)
            knobs[protocol] = calibrate(val_rankings, valset, folds)
        results = [run_protocol(models, args, knobs[p], p, evalsets[p], Path(tmp)) for p in args.protocols]
    header = (f"## Retrieval ablation: post-processing on raw scores, 1:1 and with distractors\n\n"
              f"model `{args.model}`" + (f", second model `{args.second_model}`" if args.second_model else "")
              + f", data `{args.data}`, ITM re-rank top-{args.rerank} (fusion weight "
              f"{models[0].config.rerank_weight}), {time.perf_counter() - started:.0f} s.\n")
    if args.note:
        header += f"\n{args.note}\n"
    text = (header + "\n" + "\n".join(calibration_markdown(p, k) for p, k in knobs.items()) + "\n"
            + "\n".join(markdown(r) for r in results))
    print(text)
    save_results(Path(args.out), {"model": args.model, "second_model": args.second_model, "data": str(args.data),
                                  "rerank": args.rerank, "note": args.note, "calibration": knobs,
                                  "protocols": results}, text)


if __name__ == "__main__":
    main()
