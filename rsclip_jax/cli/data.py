"""`rsclip data ...`: build RemoteCLIP-style pretraining data (captioning, shard building)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from rsclip_jax.data import build_cli, caption_cli

    p = sub.add_parser("data", help="caption detection/segmentation datasets and build training shards")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    caption_cli.register(data_sub)
    build_cli.register(data_sub)
