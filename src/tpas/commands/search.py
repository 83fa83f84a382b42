"""``tpas index`` (encode a gallery into a persisted index) and ``tpas search`` (query it)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tpas.commands import add_bad_image_argument, add_device_argument, add_runtime_argument

log = logging.getLogger(__name__)

DATA_FORMATS = ("pab", "cuhk", "icfg", "rstp")
# the library's FAISS_KINDS, EXACT_MAX and TOKEN_CODECS, spelled out so `tpas --help` imports no numpy
# (tests/test_search_index.py checks they agree)
FAISS_KINDS = ("auto", "flat", "ivf", "hnsw")
EXACT_MAX = 100_000
TOKEN_CODECS = ("fp16", "int8", "int4")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="encode a gallery into a search index (resumable, shardable)",
                              description="Encode gallery images with a model into INDEX: embeddings, FAISS index, "
                                          "image tokens for re-ranking. Run again to resume an interrupted "
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
    p.add_argument("--faiss", default="auto", choices=FAISS_KINDS,
                   help=f"auto (default) = exact up to {EXACT_MAX:,} images, IVF above; flat = exact; ivf/hnsw = "
                        "approximate, search depth tuned to --target-recall")
    p.add_argument("--target-recall", type=float, default=0.99,
                   help="recall@10 of exact search that approximate search is tuned to (default 0.99)")
    p.add_argument("--tokens", default="int8", choices=TOKEN_CODECS, dest="token_codec",
                   help="re-rank store codec: int8 (default, half of fp16), int4 (a quarter), fp16")
    p.add_argument("--no-tokens", action="store_true", help="skip the image tokens (smaller index, no re-ranking)")
    add_runtime_argument(p)
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
    add_runtime_argument(s)
    s.set_defaults(func=run_search)


def run_index(args: argparse.Namespace) -> int:
    from tpas.data.images import check_gallery
    from tpas.errors import TpasError
    from tpas.models import create_model
    from tpas.search.index import build_index, gallery_from_folder, open_index
    from tpas.search.runtime import with_runtime

    if args.images:
        root = Path(args.images)
        gallery = check_gallery(root, gallery_from_folder(root), args.on_bad_image, root)
    else:
        from tpas.data.datasets import load_eval

        root = Path(args.data)
        evalset = load_eval(root, args.format, args.split, on_bad_image=args.on_bad_image)
        root, gallery = evalset.root, evalset.gallery
    if not 0 < args.target_recall <= 1:
        raise TpasError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    model = with_runtime(create_model(args.model, device=args.device), args.runtime)
    out = build_index(model, gallery, root, args.out, batch_size=args.batch_size, workers=args.workers,
                      chunk_size=args.chunk_size, faiss_kind=args.faiss, keep_tokens=not args.no_tokens,
                      token_codec=args.token_codec, target_recall=args.target_recall, overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"indexed {len(gallery)} images into {out}")
        print(describe_search(open_index(out).meta))
    return 0


def describe_search(meta: dict) -> str:
    """One line on the index's search structure and its recall against exact search."""
    search = meta.get("search", {"kind": meta.get("faiss", "flat"), "recall_at_10": None})
    if search["kind"] == "flat":
        line = "search: exact (flat inner product), recall@10 1.0"
    else:
        line = (f"search: {search['kind']} {search['param']}={search['depth']}, recall@10 {search['recall_at_10']} "
                f"of exact on {search.get('recall_queries')} (target {search.get('target_recall')})")
    if meta.get("token_shards"):
        line += f"; re-rank store {meta.get('token_codec', 'fp16')}, {meta.get('token_bytes', '?')} B per image"
    return line


def run_search(args: argparse.Namespace) -> int:
    import json

    from tpas.models import create_model
    from tpas.search.engine import SearchEngine
    from tpas.search.runtime import with_runtime

    from tpas.serve.app import query_notice

    model = with_runtime(create_model(args.model, device=args.device), args.runtime)
    engine = SearchEngine(args.index, model, itm_mode=args.itm)
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
