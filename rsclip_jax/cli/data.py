"""`rsclip data ...`: build RemoteCLIP-style pretraining data (captioning, shard building) and
prepare downstream datasets as TFDS array_record datasets (`rsclip data tfds`)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.data import build_cli, caption_cli
from rsclip_jax.data.splits import DEFAULT_TRAIN_FRACTION
from rsclip_jax.evaluate.datasets import TFDS_PREFIX

TFDS_EPILOG = """examples (run from the repository root):
  rsclip data tfds --builder scenes --source data/samples/scenes --data-dir runs/tfds
  rsclip data tfds --builder retrieval --source data/samples/retrieval --data-dir runs/tfds
  rsclip data tfds --builder scenes --config aid --source /data/AID --data-dir ~/tfds
  rsclip data tfds --builder scenes --source data/samples/scenes --data-dir runs/tfds_beam \
      --beam-pipeline-options runner=DirectRunner,direct_num_workers=2

The command prints the prepared dataset's folder; `rsclip eval` reads it as tfds:FOLDER, e.g.
  rsclip eval --checkpoint CKPT --task knn --scenes tfds:runs/tfds/remoteclip_scenes/custom/1.1.0
Run it again after the source folder changed and the dataset is rebuilt. See docs/tfds.md."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help=COMMAND_HELP["data"])
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    caption_cli.register(data_sub)
    build_cli.register(data_sub)
    _register_tfds(data_sub)


def _register_tfds(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "tfds", help="prepare a downloaded scene or Karpathy retrieval dataset as a TFDS array_record dataset",
        description="Prepare a downstream dataset with the TFDS builders (array_record files, no TensorFlow): a "
        "folder per class (--builder scenes, split as `rsclip eval --scenes` splits the folder) or a Karpathy "
        "dataset_*.json with its images folder (--builder retrieval). An up-to-date copy is reused; a copy "
        "whose source files changed is rebuilt.",
        epilog=TFDS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builder", required=True, choices=("scenes", "retrieval"),
                   help="scenes: <source>/<class>/<image>; retrieval: <source>/dataset*.json + images/")
    p.add_argument("--source", required=True, metavar="DIR", help="the downloaded dataset (tfds' manual_dir)")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="where prepared datasets live (<data-dir>/remoteclip_<builder>/<config>/<version>)")
    p.add_argument("--config", default="custom", metavar="NAME",
                   help="the builder config: custom (default; any folder of the layout) or a named dataset, whose "
                   "layout and class count are checked (scenes: aid, eurosat, resisc45, ...; retrieval: rsicd, "
                   "rsitmd, ucm; the tables in docs/tfds.md)")
    p.add_argument("--train-fraction", type=float, default=DEFAULT_TRAIN_FRACTION, metavar="F",
                   help=f"scenes without train/ and test/ folders: per-class share that goes to train "
                   f"(default {DEFAULT_TRAIN_FRACTION}); another value gets its own config, e.g. custom_train70")
    p.add_argument("--beam-pipeline-options", default=None, metavar="OPTS",
                   help="build as an Apache Beam pipeline with these comma-separated KEY=VALUE options, as "
                   "`tfds build` takes them, e.g. runner=DirectRunner,direct_num_workers=4 (needs "
                   "pip install -e \".[beam]\"; Dataflow, Flink and Spark in docs/tfds.md)")
    p.set_defaults(func=run_tfds)


def run_tfds(args: argparse.Namespace) -> int:
    """Prepares the dataset and prints where it is and how to evaluate on it."""
    if args.builder == "retrieval" and args.train_fraction != DEFAULT_TRAIN_FRACTION:
        raise ValueError("--train-fraction applies to --builder scenes; retrieval splits come from the JSON")
    # tensorflow_datasets takes about a second to import; only this subcommand needs it.
    from rsclip_jax.data.tfds_prepared import beam_pipeline_options, prepare_dataset

    beam_options = None
    if args.beam_pipeline_options is not None:
        try:
            beam_options = beam_pipeline_options(args.beam_pipeline_options)
        except ValueError as e:
            raise ValueError(f"--beam-pipeline-options: {e}") from None
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints progress to stdout; stdout is the path alone
        prepared = prepare_dataset(args.builder, args.config, args.data_dir, args.source,
                                   train_fraction=args.train_fraction, beam_options=beam_options)
    sizes = ", ".join(f"{split} {n}" for split, n in sorted(prepared.split_sizes.items()))
    what = {"built": "built", "rebuilt": "rebuilt (the source changed)", "reused": "up to date, reused"}
    print(f"{prepared.name}: {what[prepared.action]}; {sizes} records", file=sys.stderr)
    flag = "--scenes" if args.builder == "scenes" else "--karpathy-json"
    print(f"evaluate with: rsclip eval --checkpoint CKPT --task ... {flag} {TFDS_PREFIX}{prepared.path}",
          file=sys.stderr)
    print(prepared.path)
    return 0
