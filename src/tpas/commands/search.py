"""``tpas index`` (encode a gallery into a persisted index) and ``tpas search`` (query it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tpas.commands import add_bad_image_argument, add_device_argument

log = logging.getLogger(__name__)

DATA_FORMATS = ("pab", "cuhk", "icfg", "rstp")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="encode a gallery into a search index (resumable, shardable)",
                              description="Encode gallery images with a model into INDEX: embeddings, FAISS index, "
                                          "fp16 image tokens for re-ranking. Run again to resume an interrupted "
                                          "build; under `accelerate launch` every process encodes one shard.")
    p.add_argument("--model", required=True, help="model directory (save_pretrained) or a named model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset root; its evaluation split's gallery is indexed")
    src.add_argument("--images", help="a folder of images (recursive); ids = relative paths without extension")
    p.add_argument("--format", default="pab", choices=DATA_FORMATS, help="dataset format of --data (default pab)")
    p.add_argument("--split", default="test", help="evaluation split of --data (default test)")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--chunk-size", type=int, default=2048, help="images per resumable chunk")
    p.add_argument("--faiss", default="flat", choices=("flat", "ivf", "hnsw"),
                   help="flat = exact inner product (default); ivf/hnsw = approximate, for millions of images")
    p.add_argument("--no-tokens", action="store_true", help="skip the image tokens (smaller index, no re-ranking)")
    p.add_argument("--overwrite", action="store_true", help="replace an index built for another model or gallery")
    add_bad_image_argument(p)
    add_device_argument(p)
    p.set_defaults(func=run_index)

    s = subparsers.add_parser("search", help="search an index with a text query",
                              description="Print the top-k gallery images for a text, with scores and paths.")
    s.add_argument("text", nargs="+", help="the query text (several words are joined)")
    s.add_argument("--index", required=True, help="index directory written by `tpas index`")
    s.add_argument("--model", required=True, help="the model the index was built with")
    s.add_argument("--k", type=int, default=10, help="how many results (default 10)")
    s.add_argument("--rerank", type=int, default=0, help="re-rank the ITC top-N with ITM (e.g. 128; default 0 = off)")
    s.add_argument("--itm", default="logit", choices=("logit", "prob"), help="ITM score used in fusion")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_argument(s)
    s.set_defaults(func=run_search)


def run_index(args: argparse.Namespace) -> int:
    from tpas.data.images import check_gallery
    from tpas.models import create_model
    from tpas.search.index import build_index, gallery_from_folder

    if args.images:
        root = Path(args.images)
        gallery = check_gallery(root, gallery_from_folder(root), args.on_bad_image, root)
    else:
        from tpas.data.datasets import load_eval

        root = Path(args.data)
        evalset = load_eval(root, args.format, args.split, on_bad_image=args.on_bad_image)
        root, gallery = evalset.root, evalset.gallery
    model = create_model(args.model, device=args.device)
    out = build_index(model, gallery, root, args.out, batch_size=args.batch_size, workers=args.workers,
                      chunk_size=args.chunk_size, faiss_kind=args.faiss, keep_tokens=not args.no_tokens,
                      overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"indexed {len(gallery)} images into {out}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    import json

    from tpas.models import create_model
    from tpas.search.engine import SearchEngine

    from tpas.serve.app import query_notice

    engine = SearchEngine(args.index, create_model(args.model, device=args.device), itm_mode=args.itm)
    text = " ".join(args.text)
    hits = engine.search(text, k=args.k, rerank=args.rerank)
    notice = query_notice(text, engine.model.tokenizer)
    if notice:
        print(f"tpas search: note: {notice}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"rank": h.rank, "id": h.image_id, "score": h.score, "itc": h.itc_score,
                           "itm": h.itm_score, "path": str(h.path)} for h in hits], indent=2))
        return 0
    print(f"query: {text}")
    print(f"{'rank':>4}  {'score':>8}  {'itc':>7}  {'itm':>8}  {'id':<24} path")
    for h in hits:
        itm = f"{h.itm_score:8.3f}" if h.itm_score is not None else f"{'-':>8}"
        print(f"{h.rank:>4}  {h.score:8.4f}  {h.itc_score:7.4f}  {itm}  {h.image_id:<24} {h.path}")
    return 0
