"""RemoteCLIP ViT-B/32 continual pretraining: a learning-rate sweep around configs/remoteclip.py's 3e-5.

    rsclip sweep configs/sweeps/remoteclip_lr.py --launcher slurm --launcher-args="--nodes 2 --time 24:00:00" \
        --config.model.init_from=/weights/ViT-B-32-openai.safetensors --config.data.train=/data/remoteclip_shards

RemoteCLIP never published its learning rate; continual pretraining wants a small one (GeoRSCLIP
fine-tuned at 5e-6, batch 600). Three runs, each in runs/remoteclip_lr/lr=<value>/; with
`best_metric` set (add an eval under config.evals), `--collect` ranks them by it, else by the
final train loss.
"""

from rsclip_jax.launch.sweep import product


def get_sweep():
    return {
        "config": "configs/remoteclip.py:ViT-B-32",
        "runs": product({"optim.lr": [1e-5, 3e-5, 1e-4]}),
    }
