"""Peak RAM of ``tpas eval`` on a large gallery (target: < 4 GB for 20,000 images with lite).

Writes a synthetic gallery of ``--gallery`` small JPEGs (coloured blocks; content does not matter
for memory) and ``--queries`` captions with known targets, then runs the whole evaluation
pipeline in this process — ``run_eval``: index build (fp16 tokens memory-mapped), chunked ITC,
ITM re-ranking of the top ``--rerank``, ``--post`` post-processing, metrics, report — and reports
the peak resident set size (``ru_maxrss``) of this process and, separately, of the DataLoader
worker processes. Prints a table and saves ``benchmarks/results/eval_memory.{json,md}``.

    .venv/bin/python benchmarks/eval_memory.py                       # 20k images, 2k queries, lite
    .venv/bin/python benchmarks/eval_memory.py --gallery 500 --queries 50 --model lite-tiny   # smoke run
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, save_results  # noqa: E402  (puts src/ on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tpas.data.records import Behaviour, EvalSet, GalleryImage, Query  # noqa: E402
from tpas.eval.run import run_eval  # noqa: E402
from tpas.models import create_model  # noqa: E402

WORDS = ("man woman person red blue green black white jacket coat trousers skirt bag walking running falls "
         "fighting climbing fence street park hall bench bicycle phone box hat glasses hair short long").split()


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_gallery(root: Path, n: int, size: tuple[int, int], rng: np.random.Generator) -> list[GalleryImage]:
    from tqdm import tqdm

    h, w = size
    gallery = []
    for i in tqdm(range(n), desc="write gallery", unit="img"):
        rel = f"g/{i // 1000}/{i}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 255, (8, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((w, h), Image.NEAREST).save(path, quality=85)
        gallery.append(GalleryImage(rel, str(i), str(i), Behaviour.NORMAL if i % 2 else Behaviour.ANOMALY))
    return gallery


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--gallery", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--rerank", type=int, default=16)
    ap.add_argument("--post", default="sca")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_memory"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tpas-evalmem-"))

    peak_sampled = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak_sampled[0] = max(peak_sampled[0], rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    try:
        model = create_model(args.model).eval()
        after_model = rss_mb()
        gallery = make_gallery(work / "data", args.gallery, model.image_size, rng)
        targets = rng.integers(0, args.gallery, args.queries)
        queries = [Query(f"q{i}", " ".join(rng.choice(WORDS, 25)), str(t), gallery[t].behaviour)
                   for i, t in enumerate(targets)]
        evalset = EvalSet("synthetic-20k", work / "data", queries, gallery)
        t0 = time.perf_counter()
        result = run_eval(model, evalset, rerank=args.rerank, post=args.post, out_dir=work / "eval",
                          workers=args.workers, report_queries=8)
        seconds = time.perf_counter() - t0
        tokens_bytes = sum(p.stat().st_size for p in (work / "eval" / "index").rglob("tokens.npy"))
    finally:
        stop.set()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {
        "model": args.model, "gallery": args.gallery, "queries": args.queries, "rerank": args.rerank,
        "post": args.post, "workers": args.workers, "threads": args.threads,
        "peak_rss_mb": round(peak_self, 1), "peak_rss_sampled_mb": round(peak_sampled[0], 1),
        "peak_worker_rss_mb": round(peak_children, 1), "rss_after_model_mb": round(after_model, 1),
        "score_matrix_mb": round(args.queries * args.gallery * 4 / 2**20, 1),
        "token_file_mb": round(tokens_bytes / 2**20, 1), "eval_seconds": round(seconds, 1),
        "timings": result.timings, "R@1": result.metrics["R@1"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
    }
    text = "\n".join([
        f"Eval memory: {args.model}, {args.gallery} gallery images, {args.queries} queries, rerank {args.rerank}, "
        f"post {args.post}", "",
        "| measure | value |", "|---|---:|",
        f"| peak RSS, eval process | {out['peak_rss_mb']:.0f} MB |",
        f"| peak RSS, one DataLoader worker | {out['peak_worker_rss_mb']:.0f} MB |",
        f"| RSS after loading the model | {out['rss_after_model_mb']:.0f} MB |",
        f"| score matrix (Q x G float32) | {out['score_matrix_mb']:.0f} MB |",
        f"| image tokens on disk (memory-mapped) | {out['token_file_mb']:.0f} MB |",
        f"| wall time | {out['eval_seconds']:.0f} s |", "",
        f"stage timings (s): {out['timings']}",
    ]) + "\n"
    print(text)
    dest = Path(args.out)
    save_results(dest, out, text)


if __name__ == "__main__":
    main()
