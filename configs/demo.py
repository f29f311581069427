"""A tiny CLIP trained from scratch on the bundled samples: the README's main job.

    rsclip train --config configs/demo.py --workdir runs/demo_train

Runs in a few minutes on 2 CPU cores. It learns the sample corpus's captions (trees, buildings,
land use) well enough to beat random ranking on the held-out retrieval split.
"""

from rsclip_jax.train.config import default_config


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
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.05
    c.data.train = "runs/demo_data/train"
    c.evals.retrieval_json = "data/samples/retrieval/dataset_samples.json"
    c.evals.retrieval_images = "data/samples/retrieval/images"
    c.evals.batch_size = 32
    return c
