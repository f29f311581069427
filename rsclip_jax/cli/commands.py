"""The `rsclip` subcommands: which module of `rsclip_jax.cli` runs each, and its one-line help.

Kept free of imports so that `rsclip --help` lists every command without importing any of them
(together they pull in JAX, flax, transformers and more: seconds), and a command imports only its
own module. Each module's `register` adds its commands' parsers with the help given here.
"""

from __future__ import annotations

# command -> module under rsclip_jax.cli, in the order `rsclip --help` lists them
COMMAND_MODULES: dict[str, str] = {
    "embed": "embed",
    "classify": "embed",
    "models": "checkpoints",
    "init": "checkpoints",
    "convert": "checkpoints",
    "data": "data",
    "train": "train",
    "eval": "eval",
    "demo": "demo",
    "map": "mapping",
    "index": "index",
    "search": "index",
    "serve": "serve",
    "launch": "launch",
    "sweep": "sweep",
}

COMMAND_HELP: dict[str, str] = {
    "embed": "embed images and/or captions to an .npz file",
    "classify": "zero-shot classify images with remote-sensing prompt templates",
    "models": "list the known model architectures",
    "init": "write a randomly initialised model as an OpenCLIP checkpoint",
    "convert": ("convert a checkpoint, OpenCLIP/transformers folder or workdir to .pt/.safetensors, an OpenCLIP "
                "hub folder or a transformers folder (records the architecture)"),
    "data": "caption detection/segmentation datasets, build training shards, prepare TFDS evaluation datasets",
    "train": "train (or resume) a CLIP model from a config file",
    "eval": "evaluate a model: zero-shot, linear probe, k-NN, few-shot, retrieval, counting",
    "demo": "build data, train and evaluate on the bundled samples (README quick start)",
    "map": "zero-shot map of a whole scene (GeoTIFF/COG/JP2, band folder, STAC item)",
    "index": "build or extend a text-and-image search index over images and scene tiles",
    "search": "search an index by text or example image",
    "serve": "a local web page to search an index by text or image, with a map",
    "launch": "run train/eval as a multi-process job: local, SLURM, TPU pod or plain hosts",
    "sweep": "a hyperparameter sweep: many train runs from one sweep file, and their table",
}
