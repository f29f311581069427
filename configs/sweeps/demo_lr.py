"""A tiny learning-rate sweep of configs/demo.py: 4 runs of 5 steps, for the docs and the tests.

    rsclip sweep configs/sweeps/demo_lr.py --max-parallel 2
    rsclip sweep configs/sweeps/demo_lr.py --collect

Each run trains in runs/demo_lr/lr=<value>/ (about half a minute each on 2 CPU cores, most of it
compiling). The evals are dropped to keep it short, so the runs are ranked by their final train
loss; keep them (remove "evals" below) to rank by retrieval/mean_recall instead.
"""

from rsclip_jax.launch.sweep import product


def get_sweep():
    return {
        "config": "configs/demo.py",
        "overrides": {"total_steps": 5, "batch_size": 8, "log_every_steps": 1, "optim.warmup_steps": 1,
                      "evals": {}},
        "runs": product({"optim.lr": [1e-4, 1e-3, 1e-2, 1e-1]}),
        "metric": "loss",
        "mode": "min",
    }
