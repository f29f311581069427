"""RemoteCLIP continual pretraining from OpenAI CLIP weights.

    rsclip train --config configs/remoteclip.py:ViT-B-32 --workdir runs/rc_b32 \
        --config.model.init_from=/weights/ViT-B-32-openai.safetensors \
        --config.data.train=/data/remoteclip_shards

The argument picks the architecture: RN50, ViT-B-32 (default) or ViT-L-14. RemoteCLIP trained
from OpenAI CLIP with the InfoNCE loss; its batch size, learning rate, epochs and augmentation were
never published. The values below are documented assumptions for ~166k images (one random caption
of five per sample): small learning rate, as in continual pretraining (GeoRSCLIP used 5e-6 with
batch 600 for fine-tuning), 20 epochs at batch 1024, remote-sensing flips and rotations.
`init_from` takes an OpenCLIP state_dict (.pt/.safetensors): convert OpenAI's TorchScript files
with open_clip first (`open_clip.create_model("ViT-B-32-quickgelu", pretrained="openai")`).

Augmentation: flips and 90-degree rotations are on (remote-sensing scenes have no canonical up),
which is safe for B2C/M2B captions (they say "middle"/"edge", never left/right). Human captions
(RSICD, RSITMD, UCM) sometimes do say "on the left of"; to keep those exact, train with
`--config.data.hflip=False --config.data.vflip=False --config.data.rot90=False`.
"""

from rsclip_jax.train.config import default_config

ARCHS = {"RN50": "RemoteCLIP-RN50", "ViT-B-32": "RemoteCLIP-ViT-B-32", "ViT-L-14": "RemoteCLIP-ViT-L-14"}


def get_config(arg: str = "ViT-B-32"):
    if arg not in ARCHS:
        raise ValueError(f"configs/remoteclip.py: unknown architecture {arg!r}; choose {', '.join(ARCHS)}")
    c = default_config()
    c.model.name = ARCHS[arg]
    c.model.dtype = "bfloat16"
    c.model.visual_remat = c.model.text_remat = "dots_saveable"
    c.batch_size = 1024
    c.total_steps = 3240  # ~20 epochs of 165,745 images
    c.log_every_steps = 20
    c.checkpoint_every_steps = 500
    c.eval_every_steps = 500
    c.optim.lr = 3e-5 if arg != "ViT-L-14" else 2e-5
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.2
    c.mesh.shape = (-1, 1, 1)
    if arg == "ViT-L-14":
        c.mesh.shape = (1, -1, 1)  # FSDP: shard parameters and Adam state over the devices
    return c

