"""The collectives of a compiled (SPMD-partitioned) XLA module, from its HLO text, per device per step.

`compiled.as_text()` is the program one device runs. Each collective is counted with the bytes of
its payload on that device: the result of an all-gather, all-reduce, all-to-all or
collective-permute, and the operand of a reduce-scatter (its result times the group size), since
compiled HLO names operands without their shapes. What goes over the wire depends on the algorithm:
a ring moves (n-1)/n of that for an all-gather or reduce-scatter and 2(n-1)/n for an all-reduce.

Counting rules, each a way an earlier count went wrong:
* a collective inside a `while` body (a scan over layers, gradient accumulation) runs once per
  trip: it is multiplied by the trip count XLA records on the loop (`known_trip_count`), through
  nested loops; a loop without one is counted once and reported in `unknown_trip_counts`;
* an asynchronous pair (`all-gather-start` / `all-gather-done`) is one collective: only the
  `-done`, whose result is the payload, is counted (a `-start`'s tuple also holds the operand);
* a `conditional` runs one branch: the branch with the most bytes is counted, not their sum;
* a combined collective (a tuple of arrays) counts each array.

Payload dtypes: XLA CPU has no bfloat16 collectives, so after SPMD partitioning its float
normalization widens each one to float32: the bfloat16 value is converted to float32 just before
the collective (and back after). A GPU or TPU moves the bfloat16 value. With `widened_bf16=True`
(what a CPU plan passes) an array whose operand is such a float32 copy of a bfloat16 value is
counted in bfloat16: `convert(bf16 value)` itself, or a fusion whose root is that convert (through
bitcasts, layout copies or transposes), the shape FSDP's parameter gathers of a bfloat16 step take
on CPU.

Every payload is also classified by shape: `parameters` when its element count is that of a
parameter (whole, or one layer of a stacked one), `embeddings` when it is (batch, embed_dim)-sized
(the loss gathering every device's embeddings), else `activations/other`. This is a heuristic (a
shape can coincide), good enough to tell FSDP's parameter gathers from activations moving.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Iterable

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8,
                "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s([a-z][a-z\-]*)\(")


@dataclasses.dataclass
class Collectives:
    """Per-device payload bytes of one execution of a module's entry computation."""

    by_kind: Counter  # kind -> bytes
    by_class: Counter  # (kind, class) -> bytes, class in parameters | embeddings | activations/other
    count: Counter  # kind -> number of executions
    unknown_trip_counts: int  # while loops counted once because XLA recorded no trip count
    largest: list[dict] = dataclasses.field(default_factory=list)  # the biggest collectives, for a reader
    narrowed: int = 0  # arrays counted in bfloat16 that the backend widened to float32 (module docstring)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO type string, e.g. `(f32[8,16]{1,0}, bf16[4])`."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text)
            if dt in _DTYPE_BYTES]


def group_size(line: str) -> int:
    """Devices per replica group of a collective, in any of the three notations XLA prints.

    `replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` (the product over the named axes),
    `replica_groups=[2,4]<=[8]` (iota: 2 groups of 4) or `replica_groups={{0,1,2,3},{4,5,6,7}}`.
    """
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes.get(name, 1) for name in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
    if iota:
        return int(iota.group(1))
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    return len(explicit.group(1).split(",")) if explicit else 1


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    computations: dict[str, list[str]] = {}
    name = entry = None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            name = header.group(2)
            computations[name] = []
            if header.group(1):
                entry = name
        elif name is not None and line.strip() and line.strip() != "}":
            computations[name].append(line)
    return computations, entry


def _payloads(line: str) -> tuple[str, list[tuple[str, tuple[int, ...]]]] | None:
    """(kind, arrays) of a collective instruction (the `-done` of an async pair), else None."""
    op = _OP.search(line)
    if not op:
        return None
    result_type, kind = op.group(1), op.group(2)
    base = kind.removesuffix("-start").removesuffix("-done")
    if base not in KINDS or kind.endswith("-start"):
        return None
    return base, _full(result_type, group_size(line) if base == "reduce-scatter" else 1)


_NAMED = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)")


def _operands(line: str) -> list[str]:
    """The names of an instruction's operands (those before the first closing parenthesis)."""
    op = _OP.search(line)
    return re.findall(r"%([\w.\-]+)", line[op.end():].split(")", 1)[0]) if op else []


def _definitions(lines: list[str]) -> dict[str, str]:
    """Instruction name -> its line, in one computation."""
    return {m.group(1): line for line in lines if (m := _NAMED.match(line))}


def _root(lines: list[str]) -> str | None:
    return next((line for line in lines if line.lstrip().startswith("ROOT ")), None)


def _is_widened_bf16(line: str | None, defs: dict[str, str], computations: dict[str, list[str]], depth: int = 0) -> bool:
    """Whether `line` computes a float32 copy of a bfloat16 value: `convert(%x)` with `x` bfloat16,
    through bitcasts, layout copies or transposes, or a fusion whose root does (float normalization's
    widening on XLA CPU)."""
    op = _OP.search(line) if line else None
    if not op or depth > 8:
        return False
    kind, operands = op.group(2), _operands(line)
    if kind == "convert" and operands:
        source = defs.get(operands[0], "")
        named = _NAMED.match(source)
        return bool(named and named.group(2).startswith("bf16["))
    if kind in ("bitcast", "copy", "reshape", "transpose") and operands:  # the same values, moved
        return _is_widened_bf16(defs.get(operands[0]), defs, computations, depth + 1)
    if kind == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = computations.get(called.group(1), []) if called else []
        return _is_widened_bf16(_root(body), _definitions(body), computations, depth + 1)
    return False


def collectives(hlo: str, parameter_sizes: Iterable[int] = (), embedding_sizes: Iterable[int] = (),
                largest: int = 12, widened_bf16: bool = False) -> Collectives:
    """Counts the collectives of one step; sizes (element counts) classify payloads (module docstring).

    `largest`: how many of the costliest instructions to list (kind, payload type, executions per
    step, bytes per step and the JAX operation they come from). `widened_bf16`: count the float32
    copies XLA CPU makes of bfloat16 values as the bfloat16 they carry (module docstring).
    """
    params, embeddings = set(parameter_sizes), set(embedding_sizes)
    computations, entry = _computations(hlo)
    unknown, narrowed = [0], [0]
    listed: list[dict] = []
    definitions: dict[str, dict[str, str]] = {}

    def as_moved(comp: str, line: str, payload: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
        """The payload in the dtypes a GPU or TPU would move (see `widened_bf16`)."""
        operands = _operands(line)
        if not widened_bf16 or len(operands) != len(payload):
            return payload
        defs = definitions.setdefault(comp, _definitions(computations.get(comp, [])))
        moved = []
        for (dtype, dims), operand in zip(payload, operands):
            if dtype == "f32" and _is_widened_bf16(defs.get(operand), defs, computations):
                narrowed[0] += 1
                dtype = "bf16"
            moved.append((dtype, dims))
        return moved

    def classify(dims: tuple[int, ...]) -> str:
        n = math.prod(dims)
        return "parameters" if n in params else "embeddings" if n in embeddings else "activations/other"

    def count(comp: str, seen: tuple[str, ...], trips: int = 1) -> Counter:
        """Bytes and executions of `comp` run `trips` times."""
        out: Counter = Counter()  # keys: (kind, class) for bytes, ("#", kind) for executions
        for line in computations.get(comp, []):
            op = _OP.search(line)
            if not op:
                continue
            kind, collective = op.group(2), _payloads(line)
            if collective:
                base = collective[0]
                payload = as_moved(comp, line, collective[1])
                for dtype, dims in payload:
                    out[(base, classify(dims))] += math.prod(dims) * _DTYPE_BYTES[dtype] * trips
                out[("#", base)] += trips
                source = re.search(r'op_name="([^"]*)"', line)
                listed.append({"kind": base, "payload": ", ".join(f"{t}[{','.join(map(str, d))}]" for t, d in payload),
                               "executions": trips,
                               "bytes": trips * sum(math.prod(d) * _DTYPE_BYTES[t] for t, d in payload),
                               "source": source.group(1) if source else ""})
            if kind == "while":
                body = re.search(r"body=%?([\w.\-]+)", line)
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                if not known:
                    unknown[0] += 1
                if body and body.group(1) not in seen:
                    n = int(known.group(1)) if known else 1
                    out.update(count(body.group(1), seen + (body.group(1),), trips * n))
            elif kind == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else re.findall(
                    r"(?:true|false)_computation=%?([\w.\-]+)", line)
                counted = [count(b, seen + (b,), trips) for b in names if b not in seen]
                if counted:  # one branch runs: the costliest
                    out.update(max(counted, key=lambda c: sum(v for k, v in c.items() if k[0] != "#")))
            elif kind in ("call", "async-start", "fusion"):
                for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                    if called not in seen:
                        out.update(count(called, seen + (called,), trips))
        return out

    raw = count(entry, (entry,)) if entry else Counter()
    by_class = Counter({k: v for k, v in raw.items() if k[0] != "#"})
    by_kind: Counter = Counter()
    for (kind, _), v in by_class.items():
        by_kind[kind] += v
    top = sorted(listed, key=lambda e: e["bytes"], reverse=True)[:largest]
    return Collectives(by_kind, by_class, Counter({k[1]: v for k, v in raw.items() if k[0] == "#"}), unknown[0], top,
                       narrowed[0])


def _full(type_text: str, scale: int) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a collective's payload: a reduce-scatter's operand is its result times the group."""
    return [(dt, dims if scale == 1 or not dims else (dims[0] * scale, *dims[1:])) for dt, dims in arrays(type_text)]
