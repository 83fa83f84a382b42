"""A million-image gallery on one machine: build, disk, RAM, recall and latency of the served query path.

The gallery is written through the index's own writer (``build_index(..., source=...)``):

* row 0..B-1 are the B real images of a mini-PAB (train + test), encoded by the model;
* every further row is a copy of real image ``row % B`` whose ITC embedding is perturbed by
  Gaussian noise and re-normalised, with the noise sized so that two copies of one image are as
  similar as a real image is to its nearest real neighbour (median; printed as ``copy_cosine``);
  its re-rank tokens are the real image's (ITM cost depends on the token shape, not the values).

Then, in a fresh process state (the build runs in a child process), the query path the server
runs (``SearchEngine.search``: text encoding, FAISS search, optional ITM re-rank reading tokens
from the store) answers the mini-PAB test captions one at a time. Reported: build time, disk per
file, RSS after opening and after the queries, p50/p99 latency of text encoding, search and the
whole call, recall@10 of the served top-10 against exact search over all rows, and R@1/R@10 of
the real targets among the distractors. The built index is cached in ``--work`` (keyed by size,
codec, kind and model) and reused.

    python benchmarks/scale.py --model RUN/best --data /work/data/minipab-1000-s0            # 1M, int4, auto
    python benchmarks/scale.py --model RUN/best --data MINIPAB --size 20000 --out /tmp/scale_20k   # a quick look

Saves benchmarks/results/scale.{json,md} (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, save_results  # noqa: E402  (puts src/ on the path)

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (the trained lite) or a named model")
    ap.add_argument("--data", required=True, help="mini-PAB root: its images seed the gallery, its test captions query it")
    ap.add_argument("--size", type=int, default=1_000_000, help="gallery rows (default 1,000,000)")
    ap.add_argument("--codec", default="int4", choices=("fp16", "int8", "int4"), help="re-rank token store codec")
    ap.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf", "hnsw"), help="FAISS structure")
    ap.add_argument("--target-recall", type=float, default=0.99)
    ap.add_argument("--runtime", default="onnx", choices=("torch", "onnx", "onnx-int8"), help="query encoder runtime")
    ap.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime / FAISS threads")
    ap.add_argument("--rerank", type=int, default=16, help="ITM re-rank depth of the second pass (0 = skip it)")
    ap.add_argument("--queries", type=int, default=400, help="test captions to time (default: all 400)")
    ap.add_argument("--work", type=Path, default=Path("/work/data/issue14-scale"), help="where the index is cached")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale")
    ap.add_argument("--phase", default="all", choices=("all", "build"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def index_dir(args) -> Path:
    return args.work / f"index-{args.size}-{args.codec}-{args.kind}-{Path(args.model).name}"


# -- building --------------------------------------------------------------------------------------
def base_images(root: Path) -> list[str]:
    """Every distinct image of the mini-PAB, test gallery first (so its rows are 0..399)."""
    from tpas.data.datasets import load_eval, load_train

    test = [g.image for g in load_eval(root, "pab", "test").gallery]
    train = sorted({p.image for p in load_train(root, "pab").pairs} - set(test))
    return test + train


def encode_bases(model, root: Path, images: list[str], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    from tpas.search.encode import encode_images

    if cache.is_file():
        data = np.load(cache)
        return data["embeds"], data["tokens"]
    enc = encode_images(model, [root / p for p in images], batch_size=64, workers=1, keep_tokens=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeds=enc.embeds, tokens=enc.tokens)
    return enc.embeds, enc.tokens


def copy_noise(embeds: np.ndarray) -> tuple[float, float]:
    """(sigma, median nearest-neighbour cosine): copies of one image end up as close as real neighbours.

    With unit-norm noise scaled by sigma, two re-normalised copies have cosine ~ 1 / (1 + sigma^2).
    """
    sims = embeds @ embeds.T
    np.fill_diagonal(sims, -1.0)
    nn = float(np.median(sims.max(axis=1)))
    return float(np.sqrt(max(1.0 / nn - 1.0, 1e-6))), nn


def row_source(embeds: np.ndarray, tokens: np.ndarray, sigma: float, seed: int = 0, batch: int = 2048):
    """``source(lo, hi)`` for build_index: real rows first, perturbed copies after (deterministic per batch)."""
    b, e = embeds.shape

    def source(lo: int, hi: int):
        for start in range(lo, hi, batch):
            rows = np.arange(start, min(hi, start + batch))
            base = rows % b
            rng = np.random.default_rng([seed, start])
            vec = embeds[base] + (rows >= b)[:, None] * rng.standard_normal((len(rows), e), dtype=np.float32) * (
                sigma / np.sqrt(e))
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            yield start - lo, vec.astype(np.float32), tokens[base]

    return source


def build(args) -> None:
    """Child process: encode the bases, write the index, record the build time and load."""
    from tpas.data.records import GalleryImage
    from tpas.models import create_model
    from tpas.search.index import build_index
    from tpas.search.runtime import with_runtime

    set_threads(args.threads)
    root, out = Path(args.data), index_dir(args)
    model = with_runtime(create_model(args.model, device="cpu"), "onnx")
    images = base_images(root)
    t0 = time.perf_counter()
    embeds, tokens = encode_bases(model, root, images, args.work / f"bases-{Path(args.model).name}.npz")
    encode_s = time.perf_counter() - t0
    sigma, nn = copy_noise(embeds)
    gallery = [GalleryImage(image=images[i % len(images)], image_id=f"r{i:07d}", target=None) for i in range(args.size)]
    free = shutil.disk_usage(args.work).free
    print(f"{len(images)} real images (encoded in {encode_s:.0f} s), sigma {sigma:.3f}, {free / 1e9:.0f} GB free")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    build_index(model, gallery, root, out, chunk_size=32768, faiss_kind=args.kind, token_codec=args.codec,
                target_recall=args.target_recall, source=row_source(embeds, tokens, sigma))
    record = {"build_s": round(time.perf_counter() - t0, 1), "base_images": len(images), "sigma": round(sigma, 4),
              "real_nn_cosine_median": round(nn, 4), "copy_cosine": round(1 / (1 + sigma ** 2), 4),
              "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], "threads": args.threads}
    (out / "scale_build.json").write_text(json.dumps(record, indent=2))


# -- querying --------------------------------------------------------------------------------------
def rss_gb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**30, 3)


def disk(out: Path) -> dict:
    sizes: dict[str, int] = {}
    for path in out.rglob("*"):
        if path.is_file():
            key = path.name if path.parent == out else f"shards/*/{path.name}"
            sizes[key] = sizes.get(key, 0) + path.stat().st_size
    return {k: round(v / 2**30, 3) for k, v in sorted(sizes.items())}


def pct(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def time_queries(engine, texts: list[str], rerank: int) -> tuple[dict, np.ndarray]:
    """Each text through engine.search alone (what one server request runs); encode and search timed apart."""
    from tpas.search.encode import encode_texts

    for text in texts[:10]:  # warm-up: sessions, page cache of the FAISS lists
        engine.search(text, k=10, rerank=rerank)
    total, enc_ms, ann_ms, rows = [], [], [], []
    for text in texts:
        t0 = time.perf_counter()
        hits = engine.search(text, k=10, rerank=rerank)
        total.append((time.perf_counter() - t0) * 1000)
        rows.append([engine.index.position(h.image_id) for h in hits])
        if rerank == 0:  # the two halves of the ITC path, timed on their own
            t0 = time.perf_counter()
            q = encode_texts(engine.model, [text], progress=False).embeds
            t1 = time.perf_counter()
            engine.index.search(q, 10)
            enc_ms.append((t1 - t0) * 1000)
            ann_ms.append((time.perf_counter() - t1) * 1000)
    out = {"total": pct(total)}
    if enc_ms:
        out.update(encode=pct(enc_ms), search=pct(ann_ms))
    return out, np.asarray(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = index_dir(args)
    if args.phase == "build":
        build(args)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    if not (out / "meta.json").is_file():  # build in a child so this process's RSS is the server's
        cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--phase", "build"]
        subprocess.run(cmd, check=True)

    import faiss

    from tpas.data.datasets import load_eval
    from tpas.models import create_model
    from tpas.search.engine import SearchEngine
    from tpas.search.runtime import with_runtime

    set_threads(args.threads)
    built = json.loads((out / "scale_build.json").read_text())
    evalset = load_eval(args.data, "pab", "test")
    texts = [q.caption for q in evalset.queries][: args.queries]
    targets = [q.target for q in evalset.queries][: args.queries]
    load_start = os.getloadavg()
    rss0 = rss_gb()
    t0 = time.perf_counter()
    model = with_runtime(create_model(args.model, device="cpu"), args.runtime, threads=args.threads)
    engine = SearchEngine(out, model)
    open_s = time.perf_counter() - t0
    rss_open = rss_gb()
    meta = engine.index.meta

    itc, rows = time_queries(engine, texts, rerank=0)
    rss_itc = rss_gb()
    rerank = None
    if args.rerank:
        rerank, _ = time_queries(engine, texts, rerank=args.rerank)
    # exact top-10 of the same query embeddings over every row
    from tpas.search.encode import encode_texts

    q = encode_texts(model, texts, progress=False).embeds
    _, exact = faiss.knn(q, np.ascontiguousarray(engine.index.embeds), 10, metric=faiss.METRIC_INNER_PRODUCT)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())]))
    target_rows = [engine.index.items[i].image for i in range(len(evalset.gallery))]
    row_of = {img: i for i, img in enumerate(target_rows)}
    truth = [row_of[next(g.image for g in evalset.gallery if g.image_id == t)] for t in targets]
    r1 = float(np.mean([r[0] == t for r, t in zip(rows.tolist(), truth)]))
    r10 = float(np.mean([t in r for r, t in zip(rows.tolist(), truth)]))

    result = {
        "setup": {"size": args.size, "codec": args.codec, "kind": meta["faiss"], "runtime": args.runtime,
                  "threads": args.threads, "queries": len(texts), "model": args.model, "data": args.data,
                  "token_shape": meta["token_shape"], "token_bytes_per_image": meta.get("token_bytes"),
                  "cpus": os.cpu_count(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "load_avg_at_start": [round(x, 2) for x in load_start],
                  "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "build": {**built, "search": meta["search"]},
        "disk_gb": disk(out),
        "rss_gb": {"python_and_imports": rss0, "after_open": rss_open, "after_itc_queries": rss_itc, "end": rss_gb()},
        "open_s": round(open_s, 2),
        "itc": itc, "rerank": rerank, "rerank_depth": args.rerank,
        "recall_at_10_vs_exact": round(recall, 4), "R@1": round(r1, 4), "R@10": round(r10, 4),
    }
    s = result["setup"]
    lines = [f"# {args.size:,}-image gallery: {s['kind']} search, {args.codec} re-rank store, {args.runtime} text "
             f"encoder, {args.threads} threads", "",
             f"setup: {json.dumps(s)}", "",
             f"- build: {built['build_s']} s ({built['base_images']} real images + perturbed copies, copy cosine "
             f"{built['copy_cosine']}), search {json.dumps(meta['search'])}",
             f"- disk: {json.dumps(result['disk_gb'])} GB; re-rank store {meta.get('token_bytes')} B per image",
             f"- RSS: {json.dumps(result['rss_gb'])} GB; engine open {result['open_s']} s",
             f"- recall@10 of the served top-10 vs exact search: **{result['recall_at_10_vs_exact']}**; real targets "
             f"among {args.size:,} rows: R@1 {result['R@1']}, R@10 {result['R@10']}", "",
             "| path | p50 ms | p99 ms | mean ms |", "|---|---:|---:|---:|"]
    for name, row in [("text encoding (1 caption)", itc.get("encode")), ("FAISS search", itc.get("search")),
                      ("ITC search end to end (engine.search)", itc["total"]),
                      (f"+ ITM re-rank top-{args.rerank} end to end", rerank and rerank["total"])]:
        if row:
            lines.append(f"| {name} | {row['p50_ms']} | {row['p99_ms']} | {row['mean_ms']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    save_results(args.out, result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
