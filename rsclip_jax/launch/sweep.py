"""Hyperparameter sweeps: a sweep file expands into named `rsclip train` runs, one workdir each.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()` returning a dict:

    {"config": "configs/demo.py",                  # the base config, as `train --config` takes it
     "overrides": {"total_steps": 20},             # optional: applied to every run
     "runs": product({"optim.lr": [1e-4, 1e-3]}),  # the runs: a list of {key: value} dicts
     "name": "demo_lr",                            # optional (default: the file's stem)
     "metric": "loss", "mode": "min"}              # optional: what `--collect` ranks the runs by

Keys are the dotted config keys of `--config.KEY=VALUE`; each value is rendered into exactly the
text that flag takes, and every run's config is loaded up front, so a typo'd key or a value of the
wrong type fails before anything launches, naming the sweep file and the run.

Each run trains in `ROOT/NAME` (ROOT: `runs/<sweep name>` unless given), NAME made of the run's own
overrides (`lr=0.0001,seed=1`). `sweep_run.json` there records the sweep file, config, overrides and
command before the run starts; a run counts as finished when its workdir holds the checkpoint of
the config's `total_steps` (orbax publishes a step folder only when it is complete), so a rerun of
the sweep skips finished runs and relaunches the others, which resume from their checkpoints.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from rsclip_jax.checkpoint.workdir import list_steps
from rsclip_jax.fileio import atomic_write_json
from rsclip_jax.train import INTERRUPTED_EXIT_CODE
from rsclip_jax.train.config import ConfigError, load_config, python_module

RECORD = "sweep_run.json"  # what the run is: written before it starts
STATUS = "sweep_status.json"  # how its last local launch exited: written when it exits
LOG = "run.log"  # a local run's output
SWEEP_KEYS = ("config", "runs", "overrides", "name", "metric", "mode", "launcher_args")
MODES = ("min", "max")
NAME_MAX = 100  # longer run names are cut and given a hash, to stay a valid folder name


# -- combinators that sweep files use -------------------------------------------------------------


def _axes(axes: Mapping[str, Any] | None, more: Mapping[str, Any]) -> dict[str, list[Any]]:
    """`{"optim.lr": [...]}` and/or keyword axes (for keys without dots), each a list of values."""
    merged = {**(axes or {}), **more}
    for key, values in merged.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"sweep axis {key!r}: give a non-empty list of values, got {values!r}")
    return {k: list(v) for k, v in merged.items()}


def product(axes: Mapping[str, Sequence[Any]] | None = None, /, **more: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values (the first axis varies slowest): a grid search."""
    merged = _axes(axes, more)
    return [dict(zip(merged, values)) for values in itertools.product(*merged.values())]


def zipped(axes: Mapping[str, Sequence[Any]] | None = None, /, **more: Sequence[Any]) -> list[dict[str, Any]]:
    """The i-th value of every axis together: axes of equal length, one run per position."""
    merged = _axes(axes, more)
    lengths = {k: len(v) for k, v in merged.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped axes must have equal lengths, got {lengths}")
    return [dict(zip(merged, values)) for values in zip(*merged.values())]


@dataclasses.dataclass(frozen=True)
class Uniform:
    """A float uniformly in [low, high] (rounded to 3 significant digits: readable names and flags)."""

    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return _round(rng.uniform(self.low, self.high))


@dataclasses.dataclass(frozen=True)
class LogUniform:
    """A float log-uniformly in [low, high] (low > 0), rounded to 3 significant digits: learning rates."""

    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        if not 0 < self.low <= self.high:
            raise ValueError(f"LogUniform({self.low}, {self.high}): needs 0 < low <= high")
        return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclasses.dataclass(frozen=True)
class IntUniform:
    """An integer uniformly in [low, high], both included."""

    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def random_search(n: int, distributions: Mapping[str, Any] | None = None, /, seed: int = 0,
                  **more: Any) -> list[dict[str, Any]]:
    """`n` distinct runs drawn with `random.Random(seed)` (the same runs for the same seed); each
    key's distribution is a `Uniform`, `LogUniform` or `IntUniform`, or a list to choose from."""
    merged = {**(distributions or {}), **more}
    rng = random.Random(seed)
    runs: list[dict[str, Any]] = []
    for _ in range(100 * n):
        if len(runs) == n:
            break
        run = {k: rng.choice(list(d)) if isinstance(d, (list, tuple)) else d.sample(rng) for k, d in merged.items()}
        if run not in runs:
            runs.append(run)
    if len(runs) < n:
        raise ValueError(f"random_search: found only {len(runs)} distinct runs of {n} in the search space")
    return runs


# -- loading a sweep file -----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One run of a sweep: its name, its overrides and its workdir."""

    index: int
    name: str
    swept: dict[str, str]  # the run's own overrides, rendered
    args: list[str]  # every --config.KEY=VALUE of the run, in order (common, command line, its own)
    workdir: str
    config: ml_collections.ConfigDict  # the loaded config (validated)


@dataclasses.dataclass
class Sweep:
    path: str
    name: str
    config: str  # the base config spec, `configs/X.py[:ARG]`
    root: str
    runs: list[Run]
    swept_keys: list[str]
    metric: str | None
    mode: str | None
    launcher_args: dict[str, str]


def render_value(value: Any) -> str:
    """The text `--config.KEY=VALUE` takes for `value` (train parses it back into the same value)."""
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value  # a bare string, as on the command line
        return repr(value) if isinstance(parsed, str) else value  # a str key keeps digits as text
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise ValueError(f"value {value!r} ({type(value).__name__}) cannot be written as --config.KEY=VALUE; use "
                         "numbers, booleans, strings, tuples, lists or dicts of them")
    return text


def _import(path: str) -> Any:
    if not os.path.isfile(path):
        raise OSError(f"{path}: sweep file not found")
    module = python_module(path, "rsclip_sweep")
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path}: defines no get_sweep() function")
    return module.get_sweep()


def _overrides(path: str, where: str, items: Any) -> dict[str, str]:
    if not isinstance(items, Mapping):
        raise ValueError(f"{path}: {where} must be a dict of config key -> value, got {items!r}")
    out = {}
    for key, value in items.items():
        if not isinstance(key, str) or not key or key.startswith("-") or "=" in key:
            raise ValueError(f"{path}: {where}: key {key!r} must be a dotted config key such as 'optim.lr' "
                             "(without --config.)")
        try:
            out[key] = render_value(value)
        except ValueError as e:
            raise ValueError(f"{path}: {where}: {key}: {e}") from None
    return out


def _safe(text: str) -> str:
    """A folder name: brackets, quotes and spaces dropped (`shape=2,1,1`), anything else odd as `_`."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", re.sub(r"[()\[\]{}'\" ]", "", text)).strip("_")


def _names(swept: list[dict[str, str]]) -> list[str]:
    """Readable names from each run's own overrides: the key's last part unless two keys share it."""
    keys = list(dict.fromkeys(k for s in swept for k in s))
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}
    names = []
    for s in swept:
        name = _safe(",".join(f"{short[k]}={v}" for k, v in s.items())) or "base"
        if len(name) > NAME_MAX:
            name = name[: NAME_MAX - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        names.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # distinct overrides that sanitise alike: number the later ones
        if name in seen:
            names[i] = f"{name}-{i + 1}"
        seen[names[i]] = i
    return names


def load_sweep(path: str, root: str | None = None, cli_overrides: Sequence[str] = (), recorded: bool = False) -> Sweep:
    """Loads and expands a sweep file; every run's config is loaded (validated) here. `recorded`:
    a run that has a record takes its overrides from it (so `--collect` needs no --config flags)."""
    spec = _import(path)
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: get_sweep() must return a dict with 'config' and 'runs', got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"{path}: get_sweep() has unknown key(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(SWEEP_KEYS)}")
    config = spec.get("config")
    if not isinstance(config, str) or not config:
        raise ValueError(f"{path}: get_sweep() must name the base config, e.g. 'config': 'configs/demo.py'")
    runs = spec.get("runs")
    if not isinstance(runs, Sequence) or isinstance(runs, str) or not runs:
        raise ValueError(f"{path}: get_sweep()['runs'] must be a non-empty list of override dicts, e.g. "
                         "product({'optim.lr': [1e-4, 1e-3]})")
    common = _overrides(path, "overrides", spec.get("overrides", {}))
    swept = [_overrides(path, f"run {i + 1}", r) for i, r in enumerate(runs)]
    for i, s in enumerate(swept):
        if s in swept[:i]:
            raise ValueError(f"{path}: runs {swept.index(s) + 1} and {i + 1} have the same overrides {s}")
    cli = list(cli_overrides)
    for item in cli:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognized argument {item!r}: besides its options, rsclip sweep takes "
                             "--config.KEY=VALUE overrides for every run")
        key = item[len("--config."):].split("=", 1)[0]
        if any(key in s for s in swept):
            raise ValueError(f"{item}: the sweep varies {key}; change it in {path}")
    name = spec.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(name, str) or _safe(name) != name:
        raise ValueError(f"{path}: name {name!r} must be letters, digits and ._=,+- only")
    root = root or os.path.join("runs", name)
    out = []
    for i, (run_name, own) in enumerate(zip(_names(swept), swept)):
        args = [f"--config.{k}={v}" for k, v in common.items()] + cli + [f"--config.{k}={v}" for k, v in own.items()]
        old = _read_json(os.path.join(root, run_name, RECORD)) if recorded else None
        if old is not None and old.get("config") == config and isinstance(old.get("overrides"), list):
            args = old["overrides"]
        try:
            loaded = load_config(config, args)
        except ConfigError as e:
            raise ValueError(f"{path}: run {i + 1} ({run_name}): {e}") from None
        out.append(Run(i, run_name, own, args, os.path.join(root, run_name), loaded))
    metric, mode = spec.get("metric"), spec.get("mode")
    if mode is not None and mode not in MODES:
        raise ValueError(f"{path}: mode must be 'min' or 'max', got {mode!r}")
    launcher_args = spec.get("launcher_args", {})
    if not isinstance(launcher_args, Mapping) or not all(isinstance(v, str) for v in launcher_args.values()):
        raise ValueError(f"{path}: launcher_args must map a launcher to its options as one string, e.g. "
                         "{'slurm': '--nodes 2 --time 24:00:00'}")
    return Sweep(path, name, config, root, out, list(dict.fromkeys(k for s in swept for k in s)),
                 metric, mode, dict(launcher_args))


# -- a run's record and status -------------------------------------------------------------------------


def train_command(sweep: Sweep, run: Run) -> list[str]:
    """The run's `train ...` command (as `rsclip` and `rsclip launch ... --` take it)."""
    return ["train", "--config", sweep.config, "--workdir", run.workdir, *run.args]


def record(sweep: Sweep, run: Run, command: Sequence[str]) -> dict[str, Any]:
    return {"sweep": sweep.path, "name": run.name, "config": sweep.config, "overrides": run.args,
            "swept": run.swept, "command": shlex.join(command)}


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); remove it to start that run again") from None


def check_records(sweep: Sweep) -> None:
    """Refuses a ROOT whose run folders hold runs of another config or other overrides."""
    for run in sweep.runs:
        old = _read_json(os.path.join(run.workdir, RECORD))
        if old is None:
            continue
        if old.get("config") != sweep.config:
            raise ValueError(f"{run.workdir}: holds a run of {old.get('config')}, not of {sweep.config}; use another "
                             "--root or remove that folder")
        before = list(old.get("overrides") or [])
        if before != run.args:
            then = " ".join(a for a in before if a not in run.args) or "-"
            now = " ".join(a for a in run.args if a not in before) or "-"
            raise ValueError(f"{run.workdir}: was started with other overrides (only then: {then}; only now: {now}); "
                             "rerun with the same --config flags, use another --root, or remove that folder")


def write_record(sweep: Sweep, run: Run, command: Sequence[str]) -> None:
    atomic_write_json(os.path.join(run.workdir, RECORD), record(sweep, run, command))


def write_status(run: Run, exit_code: int, stopped: bool) -> None:
    """How the run's last local launch exited (`stopped`: the sweep itself told it to stop)."""
    atomic_write_json(os.path.join(run.workdir, STATUS), {"exit_code": exit_code, "stopped_by_sweep": stopped,
                                                          "log": os.path.join(run.workdir, LOG)})


@dataclasses.dataclass
class Status:
    state: str  # completed | failed | unfinished | not started
    step: int | None  # the last logged step
    detail: str = ""

    def __str__(self) -> str:
        return self.state + (f" ({self.detail})" if self.detail else "")


def _last_step(workdir: str) -> int | None:
    path = os.path.join(workdir, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except FileNotFoundError:
        return None
    try:
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (ValueError, KeyError):
        return None  # a line cut by a kill: the run is unfinished either way


def run_status(run: Run) -> Status:
    """Finished means the checkpoint of `total_steps` exists; otherwise failed (its last local
    launch exited with an error), unfinished (stopped or still going), or not started."""
    total = run.config.total_steps
    step = _last_step(run.workdir)
    if os.path.isdir(run.workdir) and total in list_steps(run.workdir):
        return Status("completed", step)
    last = _read_json(os.path.join(run.workdir, STATUS)) or {}
    code = last.get("exit_code")
    if code not in (None, 0, INTERRUPTED_EXIT_CODE) and not last.get("stopped_by_sweep"):
        what = f"signal {-code}" if code < 0 else f"exit code {code}"
        return Status("failed", step, f"{what}; log: {last.get('log')}")
    if step is None and not os.path.isfile(os.path.join(run.workdir, RECORD)):
        return Status("not started", None)
    return Status("unfinished", step, f"step {step or 0} of {total}")
