"""``tpas synth``: write mini-PAB, the embedded procedural pedestrian-anomaly dataset."""

from __future__ import annotations

import argparse

from tpas.errors import TpasError


def _size(text: str) -> tuple[int, int]:
    """``256x128`` -> (256, 128): height x width, like PAB's person crops."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256x128 (height x width), got {text!r}") from None
    return h, w


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate mini-PAB, a procedural dataset in PAB's format",
                       description="Render articulated pedestrians (normal and anomalous actions, five scenes) "
                                   "with captions, written exactly like PAB: annotation/train/pair_*.json, "
                                   "annotation/test/attr.json, a masked challenge/ copy and its answer key.")
    p.add_argument("out", help="output folder (new, empty, or an earlier mini-PAB set, which is replaced)")
    p.add_argument("--identities", type=int, default=200, help="people in total; each gets a normal and an "
                                                              "anomalous image (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--size", type=_size, default=(256, 128), help="image height x width (default 256x128)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument("--test-captions", type=int, default=1, metavar="N",
                   help="each test image gets 1 to N captions (default 1: one query per image, as PAB's test pairs)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of identities in the test split "
                                                                    "(default 0.2)")
    p.add_argument("--distractors", type=int, default=0, metavar="N",
                   help="also write track4/, an AICity'26 Track 4-style masked test set whose gallery adds both "
                        "images of N people who are in no query (default 0: none)")
    p.add_argument("--ood", action="store_true", help="also write a UCC-like split (other scenes, far camera) "
                                                      "as annotation/test/ucc.json")
    p.add_argument("--preview", action="store_true", help="write preview.png, a contact sheet of 24 images")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from tpas.data.synth import generate

    if args.workers < 1:
        raise TpasError(f"--workers must be at least 1, got {args.workers}")
    s = generate(args.out, args.identities, seed=args.seed, size=args.size, workers=args.workers, ood=args.ood,
                 preview=args.preview, test_fraction=args.test_fraction, test_captions=args.test_captions,
                 distractors=args.distractors)
    print(f"mini-PAB written to {s.root}: {s.train_identities} train / {s.test_identities} test"
          + (f" / {s.ood_identities} ucc" if s.ood_identities else "")
          + f" identities, {s.images} images, {s.queries} test queries "
          f"({s.seconds:.1f}s, {s.images_per_second:.0f} images/s)")
    print(f"  train:      {s.root / 'annotation' / 'train'}")
    print(f"  test:       {s.root / 'annotation' / 'test' / 'attr.json'}")
    if s.ood_identities:
        print(f"  ucc:        {s.root / 'annotation' / 'test' / 'ucc.json'}")
    print(f"  challenge:  {s.root / 'challenge'} (answer key: answer_key.json)")
    if s.distractor_identities:
        print(f"  track4:     {s.root / 'track4'} ({s.distractor_identities} distractor identities; "
              "answer key: answer_key.json)")
    if s.preview:
        print(f"  preview:    {s.preview}")
    return 0
