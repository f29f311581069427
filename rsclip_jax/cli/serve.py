"""`rsclip serve INDEX`: a local web page to search an index (`rsclip index build`) by text or image.

    rsclip serve runs/index --port 8080            # then open http://127.0.0.1:8080/

It listens on 127.0.0.1 unless --host says otherwise, serves only the archive's own files and
bounds uploads (--max-upload-mb). See docs/applications.md.
"""

from __future__ import annotations

import argparse
import sys

from rsclip_jax.apps.search import Searcher
from rsclip_jax.apps.serve import LOOPBACK_NAMES, bind, create_app, is_loopback, serve, url_of
from rsclip_jax.argtypes import port_number, positive_int, positive_megabytes
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.cli.common import CHECKPOINT_HELP, MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=COMMAND_HELP["serve"],
                       description="Serves a search page over INDEX (built by `rsclip index build`) on "
                                   "http://HOST:PORT/. Pages come from the package (works offline).")
    p.add_argument("index", help="the index folder written by `rsclip index build --out`")
    p.add_argument("--port", type=port_number, default=8080, help="TCP port (default 8080; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only). Anything else lets "
                        "others on the network query the index and read the archive's files")
    p.add_argument("--checkpoint", default=None,
                   help=f"{CHECKPOINT_HELP}; default: the checkpoint the index was built with")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--max-upload-mb", type=positive_megabytes, default=20.0,
                   help="largest query image accepted, in MB (default 20); larger uploads get 413")
    p.add_argument("--access-log", action="store_true", help="log every request on stderr")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    # Bind first: a taken port is reported at once, not after the model has loaded.
    sock = bind(args.host, args.port)
    try:
        if not is_loopback(args.host):
            print(f"rsclip serve: warning: listening on {args.host}: anyone who can reach this machine can "
                  "search the index and read the archive's files; use the default --host 127.0.0.1 to "
                  "keep it local", file=sys.stderr)
        searcher = Searcher(args.index, checkpoint=args.checkpoint, model=args.model, dtype=args.dtype,
                            batch_size=args.batch_size)
        # Load the model now, not at the first query: a checkpoint that is missing or is not the index's
        # is an error here, and the text tower is compiled before the page is used.
        searcher.embed_texts(["a satellite image"])
        app = create_app(searcher, max_upload_bytes=int(args.max_upload_mb * 2**20),
                         allowed_hosts=(*LOOPBACK_NAMES, args.host.strip("[]")) if is_loopback(args.host) else None)
        print(f"rsclip serve: {len(searcher)} items from {args.index} at {url_of(sock)} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        serve(app, sock, access_log=args.access_log)
    finally:
        sock.close()
    return 0
