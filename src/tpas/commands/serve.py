"""``tpas serve``: the search page and JSON API over an index."""

from __future__ import annotations

import argparse

from tpas.commands import add_device_argument, add_runtime_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    # allow_abbrev=False: "--token SECRET" must not be taken for "--token-file SECRET"
    p = subparsers.add_parser("serve", allow_abbrev=False, help="serve the search page and JSON API over an index",
                              description="Serve GET / (search page), /api/search, /images/{id}, /healthz. "
                                          "With a token ($TPAS_SERVE_TOKEN or --token-file) every API and image "
                                          "request must send Authorization: Bearer <token>.")
    p.add_argument("--index", required=True, help="index directory written by `tpas index`")
    p.add_argument("--model", required=True, help="model directory (or a named model) used to encode queries")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach (set a token too)")
    p.add_argument("--token-file", help="file whose first line is the bearer token (default: $TPAS_SERVE_TOKEN; "
                                        "never on the command line, where other users could read it)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--examples", help="text file with example queries for the page, one per line")
    add_device_argument(p)
    add_runtime_argument(p)
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    p.add_argument("--max-rerank", type=int, default=100, help="largest ITM re-rank depth a request may ask for")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most waiting queries answered by one model call (1 = no batching; default 16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tpas.serve.app import Limits
    from tpas.serve.run import build_app_for, check_bind, read_examples, read_token, serve_forever

    token = read_token(args.token_file)
    check_bind(args.host, args.allow_remote, token)  # before minutes of loading, not after
    app = build_app_for(args.index, args.model, examples=read_examples(args.examples), device=args.device,
                        runtime=args.runtime, limits=Limits(max_k=args.max_k, max_rerank=args.max_rerank),
                        max_batch=args.max_batch, token=token)
    serve_forever(app, host=args.host, port=args.port, allow_remote=args.allow_remote)
    return 0
