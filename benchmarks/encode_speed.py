"""Query and gallery encoding speed per runtime (torch, ONNX Runtime fp32, ONNX Runtime int8), side by side.

* text: one caption of ``--tokens`` WordPiece tokens (default 53, a long PAB caption) encoded
  alone, as one search request does, on 1 and on 2 threads. The runtimes take turns call by call
  (round robin), so machine load shifts hit them alike; p50 and p99 over ``--calls`` calls each.
* gallery, tensors: batches of 64 preprocessed images (random pixels: cost does not depend on
  content), images/s per batch, runtimes taking turns batch by batch;
* ITM: ``--pairs`` (caption, image) pairs per fusion call (the caption above against random
  image tokens of the model's shape), pairs/s on 2 threads, runtimes taking turns;
* gallery, end to end: ``encode_images`` over real JPEGs of ``--data`` (decoded and resized in
  ``--workers`` DataLoader processes while the model runs), the way ``tpas index`` encodes.

    python benchmarks/encode_speed.py --model RUN/best --data /work/data/minipab-1000-s0

Saves benchmarks/results/encode_speed.{json,md}. Load averages at start and end are in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import RESULTS, save_results  # noqa: E402  (puts src/ on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

WORDS = ("a young man with short black hair wearing a dark blue jacket grey trousers and white sneakers is "
         "walking along the pavement then suddenly falls to the ground near a parked car while a woman in a "
         "red coat carrying a bag looks on from the other side of the busy street in the park at night").split()


def caption_of(model, tokens: int) -> str:
    """The first words of WORDS that tokenize to ``tokens`` ids ([CLS] and [SEP] included; capped by the model)."""
    tokens = min(tokens, model.config.max_text_len)
    for n in range(1, len(WORDS) + 1):
        text = " ".join(WORDS[:n])
        if model.tokenize([text])[0].shape[1] >= tokens:
            return text
    raise ValueError(f"cannot build a {tokens}-token caption")


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite", help="model directory or named model (default lite)")
    ap.add_argument("--data", default=None, help="mini-PAB root for the end-to-end gallery pass (skipped without)")
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnx", "onnx-int8"])
    ap.add_argument("--tokens", type=int, default=53)
    ap.add_argument("--calls", type=int, default=200, help="text calls per runtime and thread count")
    ap.add_argument("--pairs", type=int, default=128, help="ITM pairs per call")
    ap.add_argument("--batches", type=int, default=6, help="64-image batches per runtime (tensors)")
    ap.add_argument("--images", type=int, default=512, help="JPEGs per runtime (end to end)")
    ap.add_argument("--workers", type=int, default=1, help="decoding processes in the end-to-end pass")
    ap.add_argument("--out", type=Path, default=RESULTS / "encode_speed")
    args = ap.parse_args(argv)

    from tpas.models import create_model
    from tpas.search.encode import encode_images, inference
    from tpas.search.runtime import OnnxModel, with_runtime

    load_start = os.getloadavg()
    model = create_model(args.model, device="cpu")
    text = caption_of(model, args.tokens)
    ids, mask = model.tokenize([text])
    result: dict = {"text": {}, "itm_pairs_per_s": {}, "gallery_tensors": {}, "gallery_end_to_end": {}}

    for threads in (1, 2):
        torch.set_num_threads(threads)
        models = {r: with_runtime(model, r, threads=threads) for r in args.runtimes}
        for m in models.values():
            if isinstance(m, OnnxModel):
                m.warm_up(("text",))
        ms: dict[str, list[float]] = {r: [] for r in models}
        with inference(model):
            for call in range(args.calls + 5):
                for r, m in models.items():
                    t0 = time.perf_counter()
                    m.encode_text(ids, mask)
                    if call >= 5:  # the first calls warm caches and thread pools
                        ms[r].append((time.perf_counter() - t0) * 1000)
        for r in models:
            result["text"][f"{r}, {threads} thread{'s' * (threads > 1)}"] = stats(ms[r])

    torch.set_num_threads(2)
    models = {r: with_runtime(model, r, threads=2) for r in args.runtimes}
    pixels = torch.randn(64, 3, *model.image_size)
    rates: dict[str, list[float]] = {r: [] for r in models}
    with inference(model):
        for batch in range(args.batches + 1):
            for r, m in models.items():
                t0 = time.perf_counter()
                m.encode_image(pixels)
                if batch:
                    rates[r].append(64 / (time.perf_counter() - t0))
    for r in models:
        result["gallery_tensors"][r] = round(float(np.median(rates[r])), 1)

    with inference(model):
        enc = model.encode_image(pixels[:1])
        text_tokens = model.encode_text(ids, mask).tokens.expand(args.pairs, -1, -1)
        image_tokens = torch.randn(args.pairs, *enc.tokens.shape[1:])
        pair_mask = mask.expand(args.pairs, -1)
        rates = {r: [] for r in models}
        for call in range(args.batches + 1):
            for r, m in models.items():
                t0 = time.perf_counter()
                m.itm_logits(image_tokens, text_tokens, pair_mask)
                if call:
                    rates[r].append(args.pairs / (time.perf_counter() - t0))
    for r in models:
        result["itm_pairs_per_s"][r] = round(float(np.median(rates[r])), 1)

    if args.data:
        from tpas.data.datasets import load_eval

        evalset = load_eval(args.data, "pab", "test")
        paths = [evalset.image_path(g.image) for g in evalset.gallery]
        paths = (paths * (args.images // len(paths) + 1))[: args.images]
        for r, m in models.items():
            t0 = time.perf_counter()
            encode_images(m, paths, batch_size=64, workers=args.workers, keep_tokens=True, progress=False)
            result["gallery_end_to_end"][r] = round(len(paths) / (time.perf_counter() - t0), 1)

    setup = {"model": args.model, "caption_tokens": int(ids.shape[1]), "caption": text, "calls": args.calls,
             "image_size": list(model.image_size), "workers": args.workers, "cpus": os.cpu_count(),
             "machine": platform.machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
             "load_avg_at_start": [round(x, 2) for x in load_start],
             "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]}
    lines = [f"# Encoding speed: {args.model}, runtimes side by side", "", f"setup: {json.dumps(setup)}", "",
             f"Text, one {ids.shape[1]}-token caption per call:", "", "| runtime, threads | p50 ms | p99 ms |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {v['p50_ms']} | {v['p99_ms']} |" for k, v in result["text"].items()]
    lines += ["", f"Gallery images/s and ITM pairs/s ({args.pairs} pairs per call), 2 threads:", "",
              f"| runtime | images/s, tensors (batch 64) | images/s, end to end (JPEG decode in {args.workers} worker) "
              "| ITM pairs/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r} | {result['gallery_tensors'][r]} | {result['gallery_end_to_end'].get(r, '–')} | "
              f"{result['itm_pairs_per_s'][r]} |" for r in models]
    table = "\n".join(lines) + "\n"
    print(table)
    save_results(args.out, {"setup": setup, **result}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
