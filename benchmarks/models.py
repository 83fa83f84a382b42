"""Model sizes and encode throughput: parameters, images/s, texts/s and ITM pairs/s.

CPU (default): ``lite`` and a small X-VLM (``xvlm-small``, skipped with a note if that family is not
installed), fp32, for each of ``--threads`` torch thread counts, at each model's own input size:

    .venv/bin/python benchmarks/models.py                        # lite + xvlm-small on 2 threads
    .venv/bin/python benchmarks/models.py --threads 1 2          # 1 thread is robust on a busy machine
    .venv/bin/python benchmarks/models.py --models lite lite-tiny clip-tiny --seconds 2

GPU (``--gpu``): ``xvlm-base`` (random weights: speed does not depend on them) in bfloat16 on
``cuda:0``, larger batches, plus peak GPU memory; a few minutes at most:

    .venv/bin/python benchmarks/models.py --gpu                  # GPU section only
    .venv/bin/python benchmarks/models.py --gpu --models lite    # lite on GPU too

images/s = ``encode_image`` on a batch of random pixels at the model's ``image_size``; texts/s =
``encode_text`` on PAB-like ~40-word captions; ITM pairs/s = ``itm_logits`` on (image, text) token
pairs, the cost of re-ranking one ITC candidate. Each figure is the median batch time over
``--seconds`` of repeats after one warm-up batch; on CPU the same per process-CPU second too (robust
to other jobs on a shared machine). Prints a table and saves
``benchmarks/results/models{,-gpu}.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from common import REPO, save_results  # noqa: E402  (puts src/ on the path)

import torch  # noqa: E402

from tpas.models import create_model  # noqa: E402
from tpas.models.base import parameter_counts  # noqa: E402
from tpas.utils.io import write_json, write_text  # noqa: E402

__all__ = ["bench_model", "main", "markdown", "timed", "word_vocab_size"]

CAPTION = ("a young man with short black hair wearing a dark blue jacket, grey trousers and white sneakers "
           "is walking along the pavement carrying a black backpack on his left shoulder while looking "
           "at the mobile phone in his right hand")


def timed(fn, seconds: float, sync=lambda: None) -> tuple[float, float]:
    """Median (wall, process-CPU) seconds of ``fn()`` over ``seconds`` of repeats (>= 3), after a warm-up.

    CPU seconds are less sensitive to other jobs on a shared machine than wall time: with T
    threads and no contention, wall throughput is about T x the per-CPU-second figure.
    """
    fn()
    sync()
    walls: list[float] = []
    cpus: list[float] = []
    start = time.perf_counter()
    while len(walls) < 3 or time.perf_counter() - start < seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def word_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the text tower's word-embedding table (the first Embedding named like one)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and ("word" in name or "token_embedding" in name):
            return module.num_embeddings
    return 2**62


def bench_model(name: str, device: str, dtype: torch.dtype, image_batch: int, text_batch: int,
                seconds: float, **overrides) -> dict:
    """One row of the table: ``name`` (with create_model ``overrides``) on ``device`` in ``dtype``."""
    t0 = time.perf_counter()
    model = create_model(name, device=device, **overrides)
    build_s = time.perf_counter() - t0
    counts = parameter_counts(model)
    model = model.to(dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    h, w = model.image_size
    pixels = torch.randn(image_batch, 3, h, w, device=device, dtype=dtype)
    ids, mask = model.tokenize([CAPTION] * text_batch, device=device)
    ids = ids % word_vocab_size(model)  # test configs may cut the vocab; speed does not depend on ids
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        img_s = timed(lambda: model.encode_image(pixels), seconds, sync)
        txt_s = timed(lambda: model.encode_text(ids, mask), seconds, sync)
        img = model.encode_image(pixels)
        txt = model.encode_text(ids[:image_batch], mask[:image_batch])
        n = min(image_batch, txt.tokens.shape[0])
        itm_s = timed(lambda: model.itm_logits(img.tokens[:n], txt.tokens[:n], txt.mask[:n]), seconds, sync)
    row = {
        "model": name, "family": model.family, "image_size": [h, w], "text_tokens": int(ids.shape[1]),
        "params_total_M": counts["total"] / 1e6,
        "params": counts, "build_s": round(build_s, 2),
        "image_batch": image_batch, "text_batch": text_batch,
        "images_per_s": image_batch / img_s[0], "texts_per_s": text_batch / txt_s[0],
        "itm_pairs_per_s": n / itm_s[0],
        "images_per_cpu_s": image_batch / img_s[1], "texts_per_cpu_s": text_batch / txt_s[1],
        "itm_pairs_per_cpu_s": n / itm_s[1],
        "image_tokens": list(img.tokens.shape[1:]), "embed_dim": int(img.embeds.shape[-1]),
    }
    if device.startswith("cuda"):
        row["peak_gpu_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def markdown(rows: list[dict], header: str) -> str:
    gpu = any("peak_gpu_mem_GiB" in r for r in rows)
    cols = ["model", "threads", "params (M)", "input HxW", "image tokens", "images/s", "texts/s", "ITM pairs/s"]
    cols += ["peak GPU GiB"] if gpu else ["images/CPU-s", "texts/CPU-s", "ITM pairs/CPU-s"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |" + " |" * (len(cols) - 2))
            continue
        cells = [r["model"], str(r.get("threads") or "-"), f"{r['params_total_M']:.1f}", "x".join(map(str, r["image_size"])),
                 "x".join(map(str, r["image_tokens"])), f"{r['images_per_s']:.1f}", f"{r['texts_per_s']:.1f}",
                 f"{r['itm_pairs_per_s']:.1f}"]
        if gpu:
            cells.append(f"{r.get('peak_gpu_mem_GiB', 0):.2f}")
        else:
            cells += [f"{r['images_per_cpu_s']:.1f}", f"{r['texts_per_cpu_s']:.1f}", f"{r['itm_pairs_per_cpu_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", help="model names (default: lite xvlm-small; with --gpu: xvlm-base)")
    parser.add_argument("--gpu", action="store_true", help="run on cuda:0 in bfloat16 (default models: xvlm-base)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="CPU torch thread counts to measure, e.g. 1 2 (default 2)")
    parser.add_argument("--image-batch", type=int, help="images per batch (default 16 CPU, 256 GPU)")
    parser.add_argument("--text-batch", type=int, help="texts per batch (default 64 CPU, 1024 GPU)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing budget per measurement (default 5)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here", file=sys.stderr)
            return 2
        device, dtype, names = "cuda:0", torch.bfloat16, args.models or ["xvlm-base"]
        image_batch, text_batch = args.image_batch or 256, args.text_batch or 1024
        torch.backends.cuda.matmul.allow_tf32 = True
        where = f"{torch.cuda.get_device_name(0)}, bfloat16"
    else:
        device, dtype, names = "cpu", torch.float32, args.models or ["lite", "xvlm-small"]
        image_batch, text_batch = args.image_batch or 16, args.text_batch or 64
        where = f"CPU {platform.processor() or platform.machine()}, float32"

    rows = []
    for threads in ([None] if args.gpu else args.threads):
        if threads is not None:
            torch.set_num_threads(threads)
        for name in names:
            try:
                row = bench_model(name, device, dtype, image_batch, text_batch, args.seconds)
            except KeyError as exc:  # e.g. the xvlm family is not installed in this checkout
                print(f"{name}: skipped ({exc.args[0] if exc.args else exc})", file=sys.stderr)
                rows.append({"model": name, "skipped": str(exc.args[0] if exc.args else exc)})
                continue
            row["threads"] = threads
            rows.append(row)
            print(f"{name} ({threads or 'gpu'}): {row['images_per_s']:.1f} images/s, {row['texts_per_s']:.1f} "
                  f"texts/s, {row['itm_pairs_per_s']:.1f} ITM pairs/s", file=sys.stderr)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (f"Model encode throughput ({where}; torch {torch.__version__}; image batch {image_batch}, "
              f"text batch {text_batch}, captions of {len(CAPTION.split())} words; "
              f"load average at the end {load} on {os.cpu_count()} CPUs)")
    table = markdown(rows, header)
    print(table)
    stem = "models-gpu" if args.gpu else "models"
    write_json(args.out / f"{stem}.json", {"setup": where, "torch": torch.__version__, "loadavg": os.getloadavg(),
                                           "cpus": os.cpu_count(), "rows": rows})
    write_text(args.out / f"{stem}.md", table)
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
