"""A tiny CLIP trained from scratch on the bundled samples: the README's main job.

    rsclip train --config configs/demo.py --workdir runs/demo_train

`config.data.train` is `runs/demo/data`, the shards `rsclip demo` builds; when they are missing,
`rsclip train` builds them first from `config.data.build_from` (the bundled captions CSV), as
`rsclip data build --csv data/samples/train/captions.csv --out runs/demo/data` would. Runs in a
few minutes on 2 CPU cores. It learns the sample corpus's captions (trees,
buildings, land use) well enough to beat random ranking on the held-out retrieval split, which
is evaluated every 100 steps (`retrieval/mean_recall` and the other recalls in eval_metrics.jsonl).
"""

import ml_collections

from rsclip_jax.train.config import default_config

# The shards `rsclip demo` builds from data/samples/train/captions.csv.
DEMO_SHARDS = "runs/demo/data"


def get_config(arg: str = ""):
    c = default_config()
    c.model.name = "tiny-ViT"
    c.seed = 0
    c.batch_size = 32
    c.total_steps = 300
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    c.eval_every_steps = 100
    c.eval_batch_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.05
    c.data.train = DEMO_SHARDS
    c.data.build_from = "data/samples/train/captions.csv"
    c.evals.retrieval = ml_collections.ConfigDict({
        "task": "retrieval",
        "karpathy_json": "data/samples/retrieval/dataset_samples.json",
        "images": "data/samples/retrieval/images",
    })
    return c
