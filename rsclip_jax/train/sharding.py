"""The device mesh and the parameter sharding rules, both from config.

Mesh axes are `data` (pure data parallelism), `fsdp` (data parallelism with parameters and
optimizer state sharded) and `model` (tensor parallelism). The batch is sharded over
(`data`, `fsdp`). Sizes of -1 take whatever devices are left. For multi-slice TPU or multi-node
GPU, `dcn_shape` gives the part of each axis that crosses the slow network (DCN) and the mesh is
built with `create_hybrid_device_mesh`, so collectives over fast-interconnect axes stay on ICI.

Parameter partitioning, MaxText style, is decided per parameter from its `logical_axes`:
1. each logical name maps to a mesh axis (or None) through `rules`;
2. then, if the parameter has at least `fsdp_min_size` elements, the largest dimension that is
   still unsharded and divisible by the `fsdp` axis size is sharded over `fsdp`;
3. anything else is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Tensor parallelism over attention heads and MLP width; everything else by FSDP or replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("heads", "model"),
    ("mlp", "model"),
    ("layers", None),
    ("embed", None),
    ("kv", None),
    ("vocab", None),
    ("proj", None),
)


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 in `shape` so the product is `num_devices`; checks the product otherwise."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} has {math.prod(shape)} devices, but {num_devices} are available")
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    dcn_shape: Sequence[int] | None = None,
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over all (or the given) devices with Auto (GSPMD) axis types.

    `shape` is the per-slice (ICI) shape; `dcn_shape` the number of slices/nodes along each axis.
    """
    devices = list(devices if devices is not None else jax.devices())
    if dcn_shape is not None and math.prod(dcn_shape) > 1:
        num_slices = math.prod(dcn_shape)
        # Multi-slice TPU devices know their slice; elsewhere (GPU nodes, CPU processes) all report
        # slice 0 and a process is the unit behind the slow network, so run one process per node.
        slices = len({getattr(d, "slice_index", 0) for d in devices})
        processes = len({d.process_index for d in devices})
        by_process = slices == 1
        if (processes if by_process else slices) != num_slices:
            raise ValueError(
                f"mesh dcn_shape {tuple(dcn_shape)} needs {num_slices} slices/nodes, but the devices span "
                f"{slices} slice(s) and {processes} process(es) (on GPU, run one process per node)"
            )
        ici = resolve_shape(shape, len(devices) // num_slices)
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, tuple(dcn_shape), devices, process_is_granule=by_process, allow_split_physical_axes=True
        )
    else:
        ici = resolve_shape(shape, len(devices))
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(grid, tuple(axis_names), axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names))


def partition_spec(
    shape: Sequence[int],
    logical_axes: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Mapping[str, str | None],
    fsdp_min_size: int,
) -> P:
    """The PartitionSpec of one parameter (see the module docstring for the policy)."""
    logical = tuple(logical_axes) if logical_axes is not None else (None,) * len(shape)
    spec: list[str | None] = []
    for dim, name in zip(shape, logical):
        axis = rules.get(name) if name is not None else None
        # a mesh axis is used at most once per array, and only where it divides the dimension
        if axis is not None and (axis in spec or dim % mesh.shape.get(axis, 1)):
            axis = None
        spec.append(axis if axis is not None and mesh.shape.get(axis, 1) > 1 else None)
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and math.prod(shape) >= fsdp_min_size and "fsdp" not in spec:
        candidates = [i for i, d in enumerate(shape) if spec[i] is None and d % fsdp == 0]
        if candidates:
            spec[max(candidates, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def state_shardings(
    state: Any,
    mesh: Mesh,
    rules: Mapping[str, str | None] | Sequence[tuple[str, str | None]] = DEFAULT_RULES,
    fsdp_min_size: int = 2**18,
) -> Any:
    """NamedShardings for every variable of an `nnx.State` (abstract or concrete), by its metadata."""
    rules = dict(rules)

    def one(v: Any) -> Any:
        if isinstance(v, nnx.Variable):
            if not hasattr(v.get_value(), "shape"):
                return v  # e.g. optax's MaskedNode for frozen parameters: no arrays, nothing to shard
            # Keep the Variable node so the result has the state's exact pytree structure.
            spec = partition_spec(v.shape, v.get_metadata().get("logical_axes"), mesh, rules, fsdp_min_size)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, partition_spec(np.shape(v), None, mesh, rules, fsdp_min_size))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Leading (batch) dimension sharded over the batch axes present in the mesh."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes))
