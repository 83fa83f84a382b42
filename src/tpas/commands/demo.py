"""``tpas demo``: generate mini-PAB, train, evaluate, report, index, then serve the search page."""

from __future__ import annotations

import argparse
from pathlib import Path

from tpas.commands import add_device_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole method end to end on a generated mini-PAB",
        description="Generate mini-PAB, train lite, evaluate (ITC, +ITM re-rank, +SCA), write report.html, "
                    "build an index and serve the search page. Re-running with the same --out resumes.")
    p.add_argument("--out", type=Path, help="run folder (default runs/demo; an existing one is resumed)")
    p.add_argument("--identities", type=int, default=3200,
                   help="mini-PAB people to generate, test people included (default 3200)")
    p.add_argument("--test-identities", type=int, default=None,
                   help="of those, people in the test split (default 200, a 400-image test gallery; a fifth "
                        "of --identities below 1,000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--config", help="training config: a shipped config's name or a YAML path (default minipab-lite)")
    p.add_argument("--rerank", type=int, default=16, help="ITM re-rank depth in the results table (default 16)")
    p.add_argument("--zero-shot", action="store_true", help="also evaluate the untrained lite model")
    p.add_argument("--workers", type=int, default=2, help="processes for data generation (default 2)")
    p.add_argument("--no-serve", dest="serve", action="store_false", help="stop after the report and index")
    p.add_argument("--host", default="127.0.0.1", help="address for the search page (default 127.0.0.1)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach (the token comes from $TPAS_SERVE_TOKEN)")
    p.add_argument("--port", type=int, default=8000, help="port for the search page (default 8000; 0 = any free)")
    add_device_argument(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides, e.g. train.epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpas.demo import DemoOptions, default_out, run_demo, serve_demo
    from tpas.errors import TpasError
    from tpas.serve.run import check_bind, read_token

    for item in args.overrides:
        if "=" not in item:
            raise TpasError(f"override {item!r} is not KEY=VALUE")
    if args.identities < 2:
        raise TpasError("--identities must be at least 2")
    if args.test_identities is None:
        args.test_identities = 200 if args.identities >= 1000 else max(1, round(args.identities / 5))
    if not 1 <= args.test_identities < args.identities:
        raise TpasError(f"--test-identities must be between 1 and --identities - 1 ({args.identities - 1}), "
                        f"got {args.test_identities}")
    token = read_token()
    if args.serve:
        check_bind(args.host, args.allow_remote, token)  # before the demo's minutes of work, not after
    opts = DemoOptions(out=args.out or default_out(), identities=args.identities,
                       test_identities=args.test_identities, seed=args.seed,
                       config=args.config, overrides=list(args.overrides), rerank=args.rerank,
                       zero_shot=args.zero_shot, workers=args.workers, serve=args.serve,
                       host=args.host, port=args.port, device=args.device)
    result = run_demo(opts)
    if opts.serve:
        serve_demo(result, host=opts.host, port=opts.port, device=opts.device, allow_remote=args.allow_remote,
                   token=token)
    return 0
