"""Sharding as data: a device mesh from the config, logical axis rules, placement of models and batches.

Every Flux parameter carries logical axis names (`logical_axes` metadata, see
`dd_jax.models.layers`): a double block's `img_mlp.0.kernel` is
("embed", "mlp"), a stacked one ("layers", "embed", "mlp"), a LoRA `lora_a`
("embed", "lora_rank"). `RULES` map those names to the mesh axes

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters (and optimizer state) sharded
    tensor  tensor parallelism (attention heads, MLP hidden)

so DP, FSDP, TP or a mix is a config change (`mesh` sizes, `rules`
overrides). The defaults shard the frozen base over `fsdp` on its hidden
("embed") dimension and over `tensor` on its head/MLP dimension; LoRA
adapters and optimizer moments carry their base kernel's names and so land
on the same devices. Activations: the batch over (data, fsdp); heads and MLP
hidden over tensor. A dimension that a mesh axis does not divide stays
whole on that axis (e.g. the LoRA rank, or a batch of 1 on a 4-way mesh).

Multi-host: `maybe_initialize_distributed` (before any other JAX call),
`make_mesh` over all processes' devices (multi-slice pods: `dcn_data`,
`dcn_fsdp` across slices), and `shard_batch` to assemble a global batch from
each process's own share of the data (Grain shard = process index).

    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        model = build(...)                        # or flux.load(..., shardings=...)
        sharding.shard_model(model, mesh, config.mesh.rules)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
        sharding.shard_model(optimizer, mesh, config.mesh.rules)
        batch = sharding.shard_batch(numpy_batch, mesh, config.mesh.rules)
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dd_jax import config as config_lib

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeAlias, TypeVar

    import ml_collections

    # logical axis name -> mesh axis name(s): pairs, a dict or a ConfigDict.
    Rules: TypeAlias = (Mapping[str, str | Sequence[str] | None] | Iterable[tuple[str, str | Sequence[str] | None]]
                        | ml_collections.ConfigDict)
    NodeT = TypeVar("NodeT", bound=nnx.Pytree)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),  # "tensor" here = sequence parallelism over the tensor axis
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    # Not "tensor": XLA (jax 0.10.2, both partitioners) miscompiles slices of a tensor-sharded modulation
    # output multiplying a tensor-sharded projection under data x fsdp x tensor meshes (see
    # tests/test_sharding_devices.py); the modulation matmul is [batch, hidden], so TP gains nothing there.
    ("mod", None),
    ("single_in", "tensor"),
    ("single_out", "tensor"),
    ("input", None),
    ("output", None),
    ("norm", None),
    ("lora_rank", None),
    ("layers", None),
)

Rules = Mapping[str, tuple[str, ...]]


def _axes(value) -> tuple[str, ...]:
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def resolve_rules(rules: Rules | None = None) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES updated with `rules` (pairs, a dict or ConfigDict; None = defaults)."""
    out = {k: _axes(v) for k, v in DEFAULT_RULES}
    if rules is None:
        return out
    if hasattr(rules, "to_dict"):
        rules = rules.to_dict()
    items = rules.items() if isinstance(rules, Mapping) else rules
    for pair in items:
        name, value = pair
        out[str(name)] = _axes(value)
    return out


def logical_to_spec(names: Iterable[str | None], mesh: Mesh, rules: Rules | None = None,
                    shape: tuple[int, ...] | None = None) -> PartitionSpec:
    """Logical axis names -> PartitionSpec on `mesh`.

    A mesh axis is used once (the first dimension naming it wins), axes of
    size 1 or not in the mesh are dropped, and with `shape` a dimension keeps
    only the leading mesh axes whose product divides it.
    """
    rules = resolve_rules(rules)
    used: set[str] = set()
    spec = []
    names = tuple(names)
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axes = [a for a in rules[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        if shape is not None:
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


# ----------------------------------------------------------------------------- mesh


def _fill(sizes: list[int], n: int, what: str) -> list[int]:
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"{what}: at most one axis size may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what}: axis sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{what}: {n} devices cannot fill sizes {sizes}")
        sizes = [n // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n:
        raise ValueError(f"{what}: sizes {sizes} use {math.prod(sizes)} devices, there are {n}")
    return sizes


def make_mesh(mesh_config: config_lib.ConfigLike | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh from `mesh_config` (`data`, `fsdp`, `tensor`; -1 fills the rest).

    Defaults (configs/base.py's `mesh`, for the fields `mesh_config` leaves out): everything on fsdp.
    For multi-slice TPU pods (or several GPU hosts joined by a slower network), `dcn_data` / `dcn_fsdp`
    give the axis sizes across slices (or processes), and `data`/`fsdp`/`tensor` are then sizes within
    one slice.
    """
    cfg = config_lib.section("mesh", mesh_config)
    devices = list(jax.devices() if devices is None else devices)
    ici = [int(cfg["data"]), int(cfg["fsdp"]), int(cfg["tensor"])]
    dcn = [int(cfg["dcn_data"]), int(cfg["dcn_fsdp"]), 1]
    if math.prod(dcn) > 1:
        per_slice = len(devices) // math.prod(dcn)
        ici = _fill(ici, per_slice, "mesh (per slice)")
        process_granule = not hasattr(devices[0], "slice_index")
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_granule)
    else:
        ici = _fill(ici, len(devices), "mesh")
        try:
            grid = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):  # unknown topology: plain order
            grid = np.asarray(devices, dtype=object).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------- models


def variable_names(var: nnx.Variable) -> tuple | None:
    """The logical axis names a Variable carries (None if none)."""
    names = var.get_metadata().get("logical_axes") if hasattr(var, "get_metadata") else None
    return tuple(names) if names else None


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    value = var.get_value()
    names = variable_names(var)
    if names is None or len(names) != len(value.shape):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, tuple(value.shape)))


def flat_shardings(module: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> dict[str, NamedSharding]:
    """Flat variable path -> NamedSharding for every variable of a (possibly abstract) module.

    `flux.load(path, shardings=lambda m: flat_shardings(m, mesh, rules))` reads a
    checkpoint straight into this placement.
    """
    rules = resolve_rules(rules)
    _, state = nnx.split(module)
    return {".".join(map(str, p)): variable_sharding(v, mesh, rules) for p, v in nnx.to_flat_state(state)}


def _put(x, sharding: NamedSharding):
    if getattr(x, "sharding", None) == sharding:
        return x
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True) is False:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # identical on every process (same seed / same checkpoint)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """What a model's blocks call to constrain activations (`constrain(x, logical names)`)."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def spec(self, names: Iterable[str | None], shape: tuple[int, ...] | None = None) -> PartitionSpec:
        return logical_to_spec(names, self.mesh, dict(self.rules), shape)

    def constrain(self, x: jax.Array, names: Iterable[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(names, x.shape)))


def shard_model(model: NodeT, mesh: Mesh, rules: Rules | None = None) -> NodeT:
    """Places every variable of an NNX object (a model, or an nnx.Optimizer) on `mesh` by its
    logical names (unnamed ones replicated), and gives the model's blocks the activation rules.
    In place; returns `model`."""
    rules = resolve_rules(rules)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and hasattr(var.get_value(), "shape"):
            var.set_value(_put(var.get_value(), variable_sharding(var, mesh, rules)))
    act = ActivationSharding(mesh, tuple(sorted(rules.items())))
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "activation_sharding"):
            node.activation_sharding = act
    return model


def unshard_activations(model: nnx.Pytree) -> None:
    """Removes the activation constraints (e.g. to run a sharded model's weights on one device)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "activation_sharding"):
            node.activation_sharding = None


def placement(model: nnx.Pytree) -> dict[str, PartitionSpec]:
    """Flat path -> the PartitionSpec each variable currently has (for logs and tests)."""
    _, state = nnx.split(model)
    out = {}
    for p, v in nnx.to_flat_state(state):
        s = getattr(v.get_value(), "sharding", None)
        out[".".join(map(str, p))] = s.spec if isinstance(s, NamedSharding) else None
    return out


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, rules: Rules | None = None, ndim: int = 1,
                   batch_size: int | None = None) -> NamedSharding:
    names = ("activation_batch",) + (None,) * (ndim - 1)
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape))


def shard_batch(tree: Any, mesh: Mesh, rules: Rules | None = None, *,
                replicate: Callable[[str], bool] | None = None) -> Any:
    """Process-local numpy batch -> global jax arrays, the batch dim over `activation_batch` (data, fsdp).

    Every process passes its own share (local batch = global / process count,
    e.g. Grain with shard_index = process index); numeric leaves with a batch
    dimension become global arrays, scalars and the leaves `replicate(path)`
    selects are replicated (every process passes the same value), and
    string/object leaves (captions) stay process-local numpy.
    """
    rules = resolve_rules(rules)
    n_proc = jax.process_count()

    def one(path, x):
        name = jax.tree_util.keystr(path)
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.dtype.kind in "OSU":
            return x
        if x.ndim == 0 or (replicate is not None and replicate(name)):
            return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), np.asarray(x))
        sharding = batch_sharding(mesh, rules, x.ndim, x.shape[0] * n_proc)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------- multi-host

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "").strip().isdigit():
            return int(os.environ[n])
    return None


def is_multihost_environment() -> bool:
    """A launcher says there are several processes (TPU pod, SLURM, Open MPI, explicit env)."""
    if any(os.environ.get(k) for k in _MULTIHOST_ENV):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    n = _env_int("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    return n is not None and n > 1


def maybe_initialize_distributed(config: config_lib.ConfigLike | None = None) -> bool:
    """Calls `jax.distributed.initialize` on multi-host runs only; True if it did.

    `config` (dict / ConfigDict, e.g. `config.distributed`), fields all optional (configs/base.py's
    `distributed` fills the rest): `enabled` ("auto" | True | False), `coordinator_address` ("host:port"),
    `num_processes` (0 = unset), `process_id` (-1 = unset), `cpu_collectives` ("gloo" for multi-process
    CPU runs). The same values can come from the
    environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
    with none of them, "auto" initializes only where a launcher says there are
    several processes (TPU pod, SLURM, Open MPI), and lets JAX detect the rest.
    Must run before anything else touches JAX's devices.
    """
    cfg = config_lib.section("distributed", config)
    if jax.distributed.is_initialized():
        return False
    enabled = cfg["enabled"]
    if isinstance(enabled, str):  # a command-line override of the "auto" string field
        low = enabled.strip().lower()
        enabled = False if low in ("false", "0", "no", "off") else True if low in ("true", "1", "yes", "on") else low
    if enabled not in (True, False, "auto"):
        raise ValueError(f"distributed.enabled must be 'auto', True or False, got {cfg['enabled']!r}")
    address = cfg["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = cfg["num_processes"] or _env_int("JAX_NUM_PROCESSES")  # 0 / None: environment or auto-detection
    pid = cfg["process_id"]
    pid = pid if pid is not None and int(pid) >= 0 else _env_int("JAX_PROCESS_ID")  # -1 / None: the same
    if enabled is False or (enabled == "auto" and not address and not is_multihost_environment()):
        return False
    collectives = cfg["cpu_collectives"] or os.environ.get("DD_JAX_CPU_COLLECTIVES")
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    kwargs = {k: v for k, v in dict(coordinator_address=address, num_processes=num, process_id=pid).items()
              if v is not None}
    jax.distributed.initialize(**kwargs)
    print(f"jax.distributed: process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", file=sys.stderr)
    return True
