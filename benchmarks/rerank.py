"""ITM re-ranking throughput: batched across queries and candidates vs one query at a time.

Both paths score exactly the same (query, candidate) pairs with ``tpas.search.rerank.itm_scores``:

* batched: every pair of every query in one flat list (ordered by text length), ``--batch`` pairs
  per fusion forward, image tokens gathered (each distinct image once per batch) from a
  memory-mapped fp16 file;
* per-query loop: one forward per query over its ``--k`` candidates (the upstream evaluation loop);
* per-pair loop (on the first ``--pair-sample`` pairs only): one forward per pair.

Image tokens are random fp16 at the model's real token shape (ITM cost does not depend on the
pixels), captions are PAB-like. Candidates overlap between queries like a real ITC top-k does
(drawn from a pool of ``--pool`` images). Reports pairs/s, the speed-up ratio and the largest
score difference between the paths (must be ~0). Prints a table and saves
``benchmarks/results/rerank.{json,md}``.

    .venv/bin/python benchmarks/rerank.py                     # lite, 16 queries x k=32, 2 threads
    .venv/bin/python benchmarks/rerank.py --model lite-tiny --queries 64 --k 128
    python3 benchmarks/rerank.py --model xvlm-base --device cuda --dtype bfloat16 --queries 64 --k 128

``compare_rerank`` is the measurement; ``benchmarks/gpu_check.py`` calls it too.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from common import REPO, save_results  # noqa: E402  (puts src/ on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tpas.models import create_model  # noqa: E402
from tpas.search.encode import encode_texts, inference  # noqa: E402
from tpas.search.rerank import default_itm_batch, itm_scores  # noqa: E402

__all__ = ["captions", "compare_rerank", "main", "rerank_markdown"]

WORDS = ("a young man with short black hair wearing a dark blue jacket grey trousers and white sneakers is "
         "walking along the pavement then suddenly falls to the ground near a parked car while a woman in a "
         "red coat carrying a bag looks on").split()


def captions(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) for _ in range(n)]


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    out, best = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def compare_rerank(model, queries: int, k: int, pool: int, batch: int | None = None, repeats: int = 2,
                   pair_sample: int = 64, seed: int = 0) -> dict:
    """Time the three re-rank paths on the same pairs where ``model`` is, in its parameters' dtype.

    Returns pairs/s per path, the speed-ups and the largest score difference between the paths.
    """
    rng = np.random.default_rng(seed)
    device = model.device
    dtype = next(model.parameters()).dtype
    batch = batch or default_itm_batch(device)
    enc = encode_texts(model, captions(queries, rng), keep_tokens=True, progress=False)
    with inference(model):
        probe = torch.zeros(1, 3, *model.image_size, device=device, dtype=dtype)
        shape = model.encode_image(probe).tokens.shape[1:]
    with tempfile.TemporaryDirectory() as tmp:
        store = np.lib.format.open_memmap(Path(tmp) / "tokens.npy", mode="w+", dtype=np.float16, shape=(pool, *shape))
        store[:] = rng.standard_normal((pool, *shape)).astype(np.float16)
        store.flush()
        del store
        tokens = np.load(Path(tmp) / "tokens.npy", mmap_mode="r")
        cands = np.stack([rng.choice(pool, k, replace=False) for _ in range(queries)])
        q_rows = np.repeat(np.arange(queries), k)
        g_rows = cands.ravel()
        pairs = len(q_rows)
        n_pair = min(pair_sample, pairs)

        def batched():
            return itm_scores(model, enc.tokens, enc.mask, tokens, q_rows, g_rows, batch_size=batch)

        def per_query():
            return np.concatenate([
                itm_scores(model, enc.tokens[q:q + 1], enc.mask[q:q + 1], tokens, np.zeros(k, np.int64),
                           cands[q], batch_size=k) for q in range(queries)])

        def per_pair():
            return np.array([itm_scores(model, enc.tokens, enc.mask, tokens, q_rows[i:i + 1], g_rows[i:i + 1],
                                        batch_size=1)[0] for i in range(n_pair)])

        batched()  # warm-up
        t_b, s_b = best_time(batched, repeats)
        t_q, s_q = best_time(per_query, repeats)
        t_p, s_p = best_time(per_pair, 1) if n_pair else (float("nan"), np.zeros(0, np.float32))
        del tokens  # the memmap must be closed before its folder goes
    rows = [
        {"path": "batched (queries x candidates)", "pairs": pairs, "seconds": t_b, "pairs_per_s": pairs / t_b},
        {"path": "one query at a time", "pairs": pairs, "seconds": t_q, "pairs_per_s": pairs / t_q},
        {"path": "one pair at a time", "pairs": n_pair, "seconds": t_p, "pairs_per_s": n_pair / t_p},
    ]
    return {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "queries": queries, "k": k, "batch": batch,
        "token_shape": list(shape), "text_len": int(enc.mask.shape[1]), "rows": rows,
        "speedup_vs_per_query": rows[0]["pairs_per_s"] / rows[1]["pairs_per_s"],
        "speedup_vs_per_pair": rows[0]["pairs_per_s"] / rows[2]["pairs_per_s"],
        "max_abs_diff_vs_per_query": float(np.abs(s_b - s_q).max()),
        "max_abs_diff_vs_per_pair": float(np.abs(s_b[:n_pair] - s_p).max()) if n_pair else 0.0,
        "score_std": float(s_b.std()), "score_abs_max": float(np.abs(s_b).max()),
    }


def rerank_markdown(result: dict, title: str) -> str:
    """The table of :func:`compare_rerank`'s three paths under ``title``."""
    lines = [title, "", "| path | pairs | seconds | pairs/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['pairs']} | {r['seconds']:.3f} | {r['pairs_per_s']:.1f} |" for r in result["rows"]]
    diff = max(result["max_abs_diff_vs_per_query"], result["max_abs_diff_vs_per_pair"])
    lines += ["", f"batched / per-query: **{result['speedup_vs_per_query']:.2f}x**; batched / per-pair: "
              f"**{result['speedup_vs_per_pair']:.2f}x**; max |score difference|: {diff:.2e} "
              f"(score std {result['score_std']:.3g})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--k", type=int, default=32, help="candidates per query")
    ap.add_argument("--pool", type=int, default=256, help="distinct gallery images the candidates come from")
    ap.add_argument("--batch", type=int, default=None, help="pairs per forward in the batched path (default: 128 on CPU, 1024 on GPU)")
    ap.add_argument("--pair-sample", type=int, default=64, help="pairs timed in the per-pair loop")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model weights (bfloat16: GPU)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rerank"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, device=args.device).to(getattr(torch, args.dtype))
    result = compare_rerank(model, args.queries, args.k, args.pool, args.batch, args.repeats, args.pair_sample)
    result.update(model=args.model, threads=args.threads,
                  machine=f"{platform.machine()} {platform.processor() or ''}".strip(), torch=torch.__version__)
    text = rerank_markdown(result, f"ITM re-rank, model {args.model} on {args.device} ({args.threads} threads, "
                                   f"{result['dtype']}), {args.queries} queries x k={args.k}, image tokens "
                                   f"{tuple(result['token_shape'])} fp16 memmap, batch {result['batch']} pairs")
    print(text)
    save_results(Path(args.out), result, text)


if __name__ == "__main__":
    main()
