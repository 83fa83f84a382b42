"""``tpas select``: choose a subset of a training set by a named strategy (random, balanced, diverse, hard)."""

from __future__ import annotations

import argparse
import os

from tpas.commands import add_device_argument

__all__ = ["register"]


def _size(text: str) -> float:
    """``0.25`` (a fraction of the pairs) or ``10000`` (a number of pairs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.25) or a number of pairs (10000), got {text!r}") from None
    if value <= 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or a whole number of pairs, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "select", help="choose a subset of the training pairs (random, balanced, diverse, hard)",
        description="Write a subset of ROOT's training pairs into OUT: ids.txt (for data.select=OUT), "
                    "selection.json, and for PAB an annotation folder that is a PAB root of its own. "
                    "A person's normal and anomalous pairs always travel together. diverse and hard embed "
                    "the pairs with --model (resumable; sharded under `accelerate launch`).")
    p.add_argument("root", help="dataset root whose training pairs are chosen from")
    p.add_argument("--out", required=True, help="folder to write the selection into")
    p.add_argument("--strategy", required=True, choices=("random", "balanced", "diverse", "hard"),
                   help="random: seeded; balanced: equal shares per behaviour label and scene; diverse: k-center "
                        "coverage of the joint image+text embedding space; hard: worst-ranked by --model")
    p.add_argument("--size", type=_size, required=True, help="a fraction of the candidate pairs (0.25) or a number "
                                                             "of pairs (10000)")
    p.add_argument("--format", default="pab", choices=("pab", "cuhk", "icfg", "rstp"), help="dataset format")
    p.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    p.add_argument("--val-identities", type=float, default=0.0,
                   help="carve these validation identities out first, as training will (its data.val_identities; "
                        "default 0 = none)")
    p.add_argument("--val-seed", type=int, default=42, help="the training config's train.seed (default 42)")
    p.add_argument("--model", default="lite", help="diverse/hard: a named model or a save_pretrained directory "
                                                   "(default lite, zero-shot)")
    p.add_argument("--checkpoint", help="diverse/hard: a family weight file (e.g. an official X-VLM .th)")
    p.add_argument("--cache", help="diverse/hard: where the pair embeddings are kept (default OUT/embeddings)")
    p.add_argument("--dims", type=int, default=64, help="diverse: PCA dimensions of the joint space (0 = all)")
    p.add_argument("--gallery", type=int, default=1024, help="hard: sampled gallery size for the rank of each pair")
    p.add_argument("--mix", type=float, default=0.0, help="hard: share of the budget left to diverse (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="image encoding batch")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--ids-only", action="store_true", help="write ids.txt and selection.json, no annotation folder")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from tpas.search.coreset import select_to_folder

    out = select_to_folder(args.root, args.out, args.strategy, args.size, fmt=args.format, seed=args.seed,
                           val_identities=args.val_identities, val_seed=args.val_seed, model=args.model,
                           checkpoint=args.checkpoint, device=args.device, cache=args.cache, dims=args.dims,
                           gallery=args.gallery, mix=args.mix, batch_size=args.batch_size, workers=args.workers,
                           annotation=not args.ids_only)
    if out is None:  # a non-main process of a sharded run: its shard is encoded
        return 0
    summary = json.loads((out / "selection.json").read_text())
    print(f"selected {summary['pairs']} of {summary['candidates']} pairs ({summary['groups']} identities) by "
          f"{summary['strategy']} into {out}")
    print(f"  train on it: data.select={out / 'ids.txt'}"
          + (f"  (or data.root={out})" if (out / "annotation" / "train").is_dir() else ""))
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    return 0
