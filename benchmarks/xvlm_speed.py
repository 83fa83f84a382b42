"""X-VLM parameter counts and encode throughput (images/s, texts/s, ITM pairs/s).

Random weights (speed does not depend on them), random pixels at the model's input size, and
tokenised pedestrian captions padded to the batch's longest (about 20 tokens).

    .venv/bin/python benchmarks/xvlm_speed.py                                   # xvlm-small, CPU, 2 threads
    .venv/bin/python benchmarks/xvlm_speed.py --models xvlm-small xvlm-base --iters 3
    .venv/bin/python benchmarks/xvlm_speed.py --models xvlm-base --device cuda --dtype bfloat16 --batch 64

Prints a table and saves benchmarks/results/xvlm_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tpas.models import create_model  # noqa: E402
from tpas.utils.io import write_json, write_text  # noqa: E402

CAPTIONS = [
    "a woman in a red jacket and blue jeans falls down on the sidewalk near a parked car",
    "a man wearing a black hoodie and grey trousers is running across the street",
    "a person in a white t-shirt climbs over a fence while carrying a backpack",
    "a young man in a green coat is fighting with another man in front of a shop",
]


def _timed(fn, iters: int, device: str) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def bench(name: str, batch: int, iters: int, device: str, dtype: torch.dtype) -> dict:
    model = create_model(name, vocab_size=30522).eval().to(device=device, dtype=dtype)
    h, w = model.image_size
    pixels = torch.randn(batch, 3, h, w, device=device, dtype=dtype)
    ids, mask = model.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], device=device)
    with torch.inference_mode():
        img = model.encode_image(pixels)
        txt = model.encode_text(ids, mask)
        t_img = _timed(lambda: model.encode_image(pixels), iters, device)
        t_txt = _timed(lambda: model.encode_text(ids, mask), iters, device)
        t_itm = _timed(lambda: model.itm_logits(img.tokens, txt.tokens, txt.mask), iters, device)
    return {
        "model": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "image_size": f"{h}x{w}",
        "text_tokens": int(ids.shape[1]),
        "batch": batch,
        "images_per_s": round(batch / t_img, 2),
        "texts_per_s": round(batch / t_txt, 2),
        "itm_pairs_per_s": round(batch / t_itm, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["xvlm-small"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "xvlm_speed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    rows = [bench(name, args.batch, args.iters, args.device, dtype) for name in args.models]
    machine = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.device} "
               f"{args.dtype}, {args.threads} threads" if args.device == "cpu" else
               f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}")
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    text = f"X-VLM encode throughput ({machine}; batch {args.batch}, {args.iters} timed iterations)\n\n" + "\n".join(table)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                               "rows": rows})
    write_text(args.out.with_suffix(".md"), text + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
