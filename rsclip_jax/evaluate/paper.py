"""`--suite remoteclip-paper`: the paper's tables regenerated next to the published numbers.

    WEIGHTS/  RemoteCLIP-RN50.pt  RemoteCLIP-ViT-B-32.pt  RemoteCLIP-ViT-L-14.pt  [CLIP-ViT-B-32.pt ...]
    DATA/     retrieval/{RSITMD,RSICD,UCM}/{dataset_*.json, images/}
              scenes/{AID,EuroSAT,MLRSNet,RESISC45,OPTIMAL-31,PatternNet,RSC11,RS2800,RSI-CB128,
                      RSI-CB256,SIRI-WHU,WHU-RS19}/<class>/<image>
              counting/RemoteCount/{counting.json, images/}

Every checkpoint file in WEIGHTS is evaluated on everything found in DATA (`suite.discover`).
A file named after a registered architecture (`rsclip models`) uses it; any other name has its
architecture inferred from the weights (QuickGELU, as OpenAI-initialised weights need). Its file
stem labels its rows; published rows are matched by that label (`paper_numbers.json`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from rsclip_jax.evaluate.datasets import canonical_dataset_name, known_datasets, name_from_path
from rsclip_jax.evaluate.models import load_model
from rsclip_jax.evaluate.suite import ALL_TASKS, Evaluator, Result, discover
from rsclip_jax.models import list_models

WEIGHT_EXTENSIONS = (".pt", ".pth", ".bin", ".safetensors")
PAPER_RETRIEVAL = ("RSITMD", "RSICD", "UCM")


def discover_weights(weights_dir: str) -> list[tuple[str, str]]:
    """[(label, path)] of the checkpoint files in weights_dir, sorted by name."""
    expected = (f"a folder of checkpoint files ({', '.join(WEIGHT_EXTENSIONS)}), e.g. RemoteCLIP-ViT-B-32.pt "
                "from the RemoteCLIP release (docs/evaluation.md)")
    if not os.path.isdir(weights_dir):
        raise FileNotFoundError(f"--weights-dir {weights_dir}: no such directory; expected {expected}")
    found = sorted(f for f in os.listdir(weights_dir) if f.lower().endswith(WEIGHT_EXTENSIONS))
    if not found:
        raise FileNotFoundError(f"--weights-dir {weights_dir}: no checkpoint files; expected {expected}")
    return [(os.path.splitext(f)[0], os.path.join(weights_dir, f)) for f in found]


def paper_specs(data_dir: str, tasks: Sequence[str] = ALL_TASKS, options: Mapping[str, Mapping[str, Any]] | None = None,
                skip_missing: bool = False) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The task specs under data_dir, with datasets renamed to the paper's names; and the paper
    datasets that were not found ({"scenes": [...], "retrieval": [...]}).

    Every spec gets a name: its subfolder's, else the one its task would take from the JSON's
    file name (`retrieval/dataset_rsitmd.json` -> RSITMD, `counting/counting.json` -> counting).
    """
    specs = discover(data_dir, tasks, options, skip_missing)
    for s in specs:
        if "root" in s:
            s["name"] = canonical_dataset_name(s["name"]) or s["name"]
        elif s["task"] == "retrieval":
            name = s.get("name") or name_from_path(s["karpathy_json"])
            s["name"] = next((p for p in PAPER_RETRIEVAL if p.lower() == name.lower()), name)
        else:
            s["name"] = s.get("name") or name_from_path(s["json"])
    found = {s["name"] for s in specs}
    missing = {"scenes": [d for d in known_datasets() if d not in found],
               "retrieval": [d for d in PAPER_RETRIEVAL if d not in found]}
    return specs, missing


def run_paper_suite(weights_dir: str, data_dir: str, tasks: Sequence[str] = ALL_TASKS, batch_size: int = 64,
                    cache_dir: str | None = None, skip_missing: bool = False, dtype: str = "float32",
                    options: Mapping[str, Mapping[str, Any]] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[list[Result], dict[str, Any]]:
    """Evaluates every checkpoint in weights_dir on every dataset found in data_dir.

    Returns:
        (results labelled by checkpoint stem, info: {"weights": {...}, "missing_datasets": {...}}).
    """
    weights = discover_weights(weights_dir)
    specs, missing = paper_specs(data_dir, tasks, options, skip_missing)
    evaluator = Evaluator(specs, batch_size, mesh, cache_dir, verbose=True)
    results, described = [], {}
    for label, path in weights:
        model, info = load_model(path, label if label in list_models() else None, dtype)
        described[label] = info
        print(f"[eval] {label}: {info['model']} from {path}", file=sys.stderr)
        results += evaluator.results(model, label)
        info["fingerprint"] = evaluator.extractor.fingerprint
    return results, {"weights": described, "missing_datasets": missing}
