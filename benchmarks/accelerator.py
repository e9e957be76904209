"""The accelerator check: the training step compiled deviceless for a TPU v5e, an H100 and an H200.

No accelerator is needed. jax's TPU compiler (``libtpu``) and CUDA plugin compile for a target
described by ``jax.experimental.topologies`` on a CPU-only machine; what they compile can be
read: the optimized HLO, the compiler's cost and memory analyses. For each option set, the step
that a user writes,

    step = jax.jit(lambda params, state, grads: (update + optax.apply_updates), donate_argnums=(0, 1))

is compiled with ``ShapeDtypeStruct`` arguments placed on the target's devices (the rows named
``apply_gradients``: ``adamx.fused.apply_gradients``, the Pallas kernels for 8-bit moments), next to
optax's same step (the peer), and measured:

* **bytes / param**: bytes the compiled program moves per parameter. TPU: the TPU compiler's own
  ``cost_analysis()["bytes accessed"]``. GPU (``cost_analysis()`` gives nothing there): our count
  of every kernel's (fusion, custom call, copy, ...) operand and output bytes in device memory in
  the optimized HLO, an operand read once per kernel that reads it (an asynchronous start/done
  pair once; an array the TPU compiler placed in on-chip memory, ``S(1)``, not at all);
  cross-checked with XLA's HLO cost analysis of the same optimized module (``xla bytes / param``).
  A Pallas kernel (the ``apply_gradients`` rows) is a custom call that neither cost analysis sees
  into: there our count is the figure on both targets.
* **ideal**: every byte of the step's arguments (params, grads, state: moments, 8-bit codes and
  scales, Kahan compensation, average, ...) read once and every byte of its results written once:
  28 for float32 Adam, 16.06 for 8-bit moments with float32 params.
* **temporaries / param**: ``memory_analysis().temp_size_in_bytes`` per parameter.
* **kernels / leaf**: full-size kernels (fusions, custom calls, copies, ... of the optimized HLO that
  move at least one byte per element of the smallest leaf; control flow entered, fusion bodies not)
  per params leaf.
* on a 2x2 TPU mesh (params split along axis 0 or axis 1 of a 2-D leaf over all four chips,
  Explicit and Auto mesh axes): the collectives in the HLO (only ``global_clipnorm``'s scalar
  all-reduce is expected) and whether ``init`` and the step give a state split like the params.
* on a GPT-2-small-shaped tree (124M params, 148 leaves): optimizer state bytes + temporaries
  against optax float32 Adam's.

Run (needs ``libtpu`` and ``jax-cuda12-plugin``/``jax-cuda12-pjrt`` of jaxlib's version,
``pip install -e ".[test,accel]"``)::

    JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=-1 python benchmarks/accelerator.py [--target tpu-v5e|h100|h200|all] [--quick]

which writes ``benchmarks/results/accelerator.md`` and ``.json`` (``--out`` changes the stem).
``tests/accel/`` asserts the goals of issues 21 and 24 with these helpers.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # deviceless: no backend but the CPU, set before jax starts
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adamx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS_DIR = os.path.join(HERE, "targets")

# ------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``platform`` is jax's plugin name, ``spec`` the TPU topology or the GPU target file."""

    name: str
    platform: str  # "tpu" | "cuda"
    spec: str

    @property
    def is_gpu(self) -> bool:
        return self.platform == "cuda"


TARGETS: dict[str, Target] = {
    "tpu-v5e": Target("tpu-v5e", "tpu", "v5e:2x2"),
    "h100": Target("h100", "cuda", "h100.txtpb"),
    "h200": Target("h200", "cuda", "h200.txtpb"),
}


class AcceleratorUnavailable(RuntimeError):
    """The compiler for a target is not installed (``libtpu`` or the CUDA plugin) or does not start."""


def plugin_versions() -> dict[str, str]:
    """Installed versions of the packages that the compile depends on ("absent" where not installed)."""
    out = {}
    for pkg in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "optax", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


@functools.cache
def topology(name: str) -> Any:
    """The ``TopologyDescription`` of target ``name`` (a key of :data:`TARGETS`), made once per process."""
    if name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {name!r}")
    target = TARGETS[name]
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        raise AcceleratorUnavailable(
            "the deviceless compile needs JAX_PLATFORMS=cpu (and CUDA_VISIBLE_DEVICES=-1 for the GPU targets) "
            "set before jax starts; `make test` and `make test-accel` set it"
        )
    from jax.experimental import topologies

    pkg = "libtpu" if target.platform == "tpu" else "jax-cuda12-plugin"
    if plugin_versions()[pkg] == "absent":
        raise AcceleratorUnavailable(
            f"target {name!r} needs the package {pkg!r} (pip install -e '.[accel]', or `make test-accel`)"
        )
    # libtpu takes a machine-wide lock file unless told otherwise: two deviceless compiles (two test
    # runs, or tests beside this benchmark) would fail with "Internal error when accessing libtpu
    # multi-process lockfile"; nothing here touches a TPU, so sharing is safe
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if target.platform == "tpu":
            return topologies.get_topology_desc(topology_name=target.spec, platform="tpu")
        with open(os.path.join(TARGETS_DIR, target.spec)) as f:
            config = f.read()
        return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=config)
    except Exception as e:  # noqa: BLE001 - the plugin's own error, named
        raise AcceleratorUnavailable(f"target {name!r}: the {pkg} compiler did not start: {e}") from e


# ------------------------------------------------------------------ option sets


@dataclasses.dataclass(frozen=True)
class OptionSet:
    """One row: ``adamx.adam(**kwargs)`` on ``param_dtype`` params and ``grad_dtype`` grads, with its optax peer."""

    name: str
    kwargs: dict[str, Any]
    param_dtype: Any = jnp.float32
    grad_dtype: Any = jnp.float32
    peer_name: str = "optax.adam"
    peer: Callable[[], optax.GradientTransformation] = lambda: optax.adam(1e-3)
    fused: bool = False  # the step is adamx.fused.apply_gradients (the Pallas kernels on GPU/TPU)

    def make(self) -> optax.GradientTransformation:
        return adamx.adam(1e-3, **self.kwargs)


OPTION_SETS: dict[str, OptionSet] = {
    o.name: o
    for o in [
        OptionSet("float32", {}),
        OptionSet("8-bit moments", {"quantize_moments": True}),
        OptionSet("8-bit moments, bf16", {"quantize_moments": True}, jnp.bfloat16, jnp.bfloat16),
        OptionSet("8-bit, apply_gradients", {"quantize_moments": True}, fused=True),
        OptionSet("8-bit, bf16, apply_gradients", {"quantize_moments": True}, jnp.bfloat16, jnp.bfloat16, fused=True),
        OptionSet("fp8 moments", {"quantize_moments": True, "moment_format": "fp8"}),
        OptionSet("fp8, apply_gradients", {"quantize_moments": True, "moment_format": "fp8"}, fused=True),
        OptionSet("4bit moments", {"quantize_moments": True, "moment_format": "4bit"}),
        OptionSet("4bit, apply_gradients", {"quantize_moments": True, "moment_format": "4bit"}, fused=True),
        OptionSet("kahan, bf16", {"param_rounding": "kahan"}, jnp.bfloat16, jnp.bfloat16),
        OptionSet("stochastic, bf16", {"param_rounding": "stochastic"}, jnp.bfloat16, jnp.bfloat16),
        OptionSet("amsgrad", {"amsgrad": True}, peer_name="optax.amsgrad", peer=lambda: optax.amsgrad(1e-3)),
        OptionSet("use_ema", {"use_ema": True}),
        OptionSet(  # optax has no per-tensor norm clip: its global one is the same step on one leaf
            "clipnorm",
            {"clipnorm": 1.0},
            peer_name="clip_by_global_norm + adam",
            peer=lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
        ),
        OptionSet(
            "global_clipnorm",
            {"global_clipnorm": 1.0},
            peer_name="clip_by_global_norm + adam",
            peer=lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
        ),
        OptionSet(
            "weight_decay",
            {"weight_decay": 0.01},
            peer_name="optax.adamw",
            peer=lambda: optax.adamw(1e-3, weight_decay=0.01),
        ),
        OptionSet(
            "accumulation 4",
            {"gradient_accumulation_steps": 4},
            peer_name="MultiSteps(adam, 4)",
            peer=lambda: optax.MultiSteps(optax.adam(1e-3), 4),
        ),
    ]
}
CODED = (  # the 0.75x goal's rows
    "8-bit moments",
    "8-bit moments, bf16",
    "8-bit, apply_gradients",
    "8-bit, bf16, apply_gradients",
    "fp8 moments",
    "fp8, apply_gradients",
    "4bit moments",
    "4bit, apply_gradients",
)
QUICK_OPTION_SETS = ("float32", *CODED, "kahan, bf16", "stochastic, bf16")

# ------------------------------------------------------------------ shapes


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """GPT-2 small's parameter shapes (124M params, 148 leaves), names as in the HF checkpoint."""
    shapes: dict[str, tuple[int, ...]] = {"wte": (50257, 768), "wpe": (1024, 768)}
    for i in range(12):
        b = f"h{i:02d}"
        shapes.update(
            {
                f"{b}.ln_1.g": (768,),
                f"{b}.ln_1.b": (768,),
                f"{b}.attn.c_attn.w": (768, 2304),
                f"{b}.attn.c_attn.b": (2304,),
                f"{b}.attn.c_proj.w": (768, 768),
                f"{b}.attn.c_proj.b": (768,),
                f"{b}.ln_2.g": (768,),
                f"{b}.ln_2.b": (768,),
                f"{b}.mlp.c_fc.w": (768, 3072),
                f"{b}.mlp.c_fc.b": (3072,),
                f"{b}.mlp.c_proj.w": (3072, 768),
                f"{b}.mlp.c_proj.b": (768,),
            }
        )
    shapes.update({"ln_f.g": (768,), "ln_f.b": (768,)})
    return shapes


SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "1 x 16M": {"w": (4096, 4096)},
    "4 x 1M": {f"w{i}": (1024, 1024) for i in range(4)},
    "GPT-2 small": gpt2_small_shapes(),
}
DEFAULT_SHAPE = {"tpu": "1 x 16M", "cuda": "4 x 1M"}

# ------------------------------------------------------------------ HLO reading

_DTYPE_BYTES = {
    "pred": 1.0,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1.0,
    "u8": 1.0,
    "s16": 2.0,
    "u16": 2.0,
    "f16": 2.0,
    "bf16": 2.0,
    "s32": 4.0,
    "u32": 4.0,
    "f32": 4.0,
    "s64": 8.0,
    "u64": 8.0,
    "f64": 8.0,
    "c64": 8.0,
    "c128": 16.0,
}
_ARRAY = re.compile(r"\b([a-z]\w*?)\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\((?!0\))\d+\)")  # a layout's memory space other than 0 (HBM): TPU VMEM, SMEM
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")
# instructions that move no data: views, tuples, parameters, scalar constants, scheduling tokens
FREE_OPCODES = frozenset(
    {
        "parameter",
        "get-tuple-element",
        "tuple",
        "bitcast",
        "constant",
        "after-all",
        "opt-barrier",
        "partition-id",
        "replica-id",
        "add-dependency",
        "domain",
    }
)
CONTROL_OPCODES = frozenset({"while", "conditional", "call", "async-start", "async-done"})
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")
_COLLECTIVE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(",
)


def shape_bytes(shape_text: str) -> float:
    """Bytes in device memory (HBM) of an HLO shape (``f32[4,8]{1,0}``, or a tuple of them); token and
    opaque shapes are 0, and so is an array whose layout puts it in on-chip memory (``S(1)``: the TPU
    compiler prefetches some operands into VMEM; the copy that brings one there counts its read)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(shape_text):
        if _ON_CHIP.search(layout):
            continue
        if dtype not in _DTYPE_BYTES:
            if dtype.startswith("f8") or dtype.startswith("s2") or dtype.startswith("u2"):
                size = 1.0 if dtype.startswith("f8") else 0.25
            else:
                continue
        else:
            size = _DTYPE_BYTES[dtype]
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """``rest`` = what follows ``name = ``: (shape text, text after it)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, after = rest.partition(" ")
    return shape, after


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


def _parse_instruction(line: str) -> Instruction | None:
    body = line.strip()
    if body.startswith("ROOT "):
        body = body[5:]
    name, eq, rest = body.partition(" = ")
    if not eq:
        return None
    shape, after = _split_shape(rest)
    m = re.match(r"([\w\-]+)\(", after)
    if not m:
        return None
    opcode = m.group(1)
    depth, i = 0, m.end() - 1
    for i in range(m.end() - 1, len(after)):
        depth += after[i] == "("
        depth -= after[i] == ")"
        if depth == 0:
            break
    operand_text, attrs = after[m.end() : i], after[i + 1 :]
    operands = [] if opcode == "constant" else _NAME.findall(operand_text)
    return Instruction(name.lstrip("%"), shape, opcode, operands, attrs)


def parse_hlo(text: str) -> tuple[str, dict[str, list[Instruction]]]:
    """The optimized HLO text of a module as (entry computation name, {computation name: instructions})."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = _parse_instruction(line)
        if ins is not None:
            comps[current].append(ins)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, comps


@dataclasses.dataclass
class Kernel:
    name: str
    opcode: str
    bytes: float


def kernels(text: str) -> list[Kernel]:
    """Every kernel of an optimized module with its operand + output bytes (an operand counted once per kernel).

    The entry computation and the bodies of its control flow (while, conditional, call) are walked;
    fusion bodies are not (a fusion is one kernel). A loop body counts once, whatever its trip count.
    """
    entry, comps = parse_hlo(text)
    out: list[Kernel] = []
    seen: set[str] = set()

    def walk(comp: str) -> None:
        if comp in seen or comp not in comps:
            return
        seen.add(comp)
        shapes = {ins.name: ins.shape for ins in comps[comp]}
        for ins in comps[comp]:
            if ins.opcode in FREE_OPCODES:
                continue
            if ins.opcode in CONTROL_OPCODES:
                for called in re.findall(
                    r"(?:condition|body|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)", ins.attrs
                ):
                    walk(called)
                for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
                    for called in _NAME.findall(group):
                        walk(called)
                continue
            # an asynchronous pair (copy-start/copy-done, ...) is one transfer: the start reads its
            # operands, the done writes its result
            done, start = ins.opcode.endswith("-done"), ins.opcode.endswith("-start")
            operand_bytes = 0.0 if done else sum(shape_bytes(shapes.get(o, "")) for o in dict.fromkeys(ins.operands))
            out.append(Kernel(ins.name, ins.opcode, operand_bytes + (0.0 if start else shape_bytes(ins.shape))))

    walk(entry)
    return out


def collectives(text: str) -> list[str]:
    """The collectives anywhere in an optimized module (fusion bodies included), as ``"op shape"``."""
    return [f"{op} {shape}" for shape, op in _COLLECTIVE.findall(text)]


def xla_bytes_accessed(text: str) -> float | None:
    """XLA's HLO cost analysis (the CPU client's) of an optimized module given as text; None where it cannot run."""
    try:
        import jaxlib._hlo as hlo
        from jax._src.lib import _jax

        module = hlo.hlo_module_from_text(text)
        return float(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)["bytes accessed"])
    except Exception:  # noqa: BLE001 - a private API: report "not available", never fail the row
        return None


# ------------------------------------------------------------------ one compile


@dataclasses.dataclass
class Measure:
    """What one compile of one step gives. Per-param figures divide by the params on one device."""

    target: str
    option: str
    tx_name: str
    shape: str
    layout: str
    n_params: int
    n_leaves: int
    bytes_per_param: float = float("nan")
    xla_bytes_per_param: float | None = None
    ideal_per_param: float = float("nan")
    temp_per_param: float = float("nan")
    kernels_per_leaf: float = float("nan")
    state_bytes: int = 0
    collectives: list[str] = dataclasses.field(default_factory=list)
    state_split: bool | None = None
    state_split_detail: str = ""
    compile_s: float = 0.0
    error: str | None = None

    @property
    def state_plus_temp(self) -> float:
        """Optimizer state bytes (global) + the step's temporaries (per device, times the devices sharing it)."""
        return self.state_bytes + self.temp_per_param * self.n_params


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _shard_elems(sds: Any) -> int:
    shape = sds.sharding.shard_shape(sds.shape)
    return int(np.prod(shape))


def _layouts(target: Target) -> list[str]:
    return (
        ["single"]
        if target.is_gpu
        else ["single", "axis 0, explicit", "axis 1, explicit", "axis 0, auto", "axis 1, auto"]
    )


def mesh_for(target_name: str, explicit: bool) -> Mesh:
    """The target's devices as a 2x2 mesh with axes ("x", "y"), Explicit or Auto."""
    devices = np.array(topology(target_name).devices)
    if devices.size != 4:
        raise ValueError(f"target {target_name!r} has {devices.size} devices, the mesh needs 4")
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return Mesh(devices.reshape(2, 2), ("x", "y"), axis_types=(kind, kind))


def _param_sharding(target_name: str, layout: str, ndim: int) -> tuple[Any, Mesh | None]:
    if layout == "single":
        return SingleDeviceSharding(topology(target_name).devices[0]), None
    axis = int(layout.split()[1].rstrip(","))
    mesh = mesh_for(target_name, explicit="explicit" in layout)
    spec: list[Any] = [None] * ndim
    if ndim > axis:
        spec[axis] = ("x", "y")
    return NamedSharding(mesh, P(*spec)), mesh


def measure(
    target_name: str,
    option: str,
    *,
    shape: str | None = None,
    layout: str = "single",
    peer: bool = False,
) -> Measure:
    """Compile one option set's step (``peer=True``: optax's same step) for one target and measure it.

    ``layout`` is ``"single"`` (one chip) or ``"axis A, explicit|auto"`` (TPU only: every 2-D leaf split
    along axis A over the 2x2 mesh, 1-D leaves replicated). A compile that fails is a row with ``error`` set.
    """
    target = TARGETS[target_name]
    opts = OPTION_SETS[option]
    shape = shape or DEFAULT_SHAPE[target.platform]
    shapes = SHAPES[shape]
    tx = opts.peer() if peer else opts.make()
    m = Measure(
        target=target_name,
        option=option,
        tx_name=opts.peer_name if peer else "adamx",
        shape=shape,
        layout=layout,
        n_params=sum(math.prod(s) for s in shapes.values()),
        n_leaves=len(shapes),
    )
    t0 = time.perf_counter()
    try:
        with jax.numpy_dtype_promotion("standard"):
            _compile_and_measure(m, target_name, tx, opts, shapes, layout)
    except AcceleratorUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - a failed compile is a result (issue 21: Explicit mesh)
        m.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    m.compile_s = time.perf_counter() - t0
    return m


measure_cached = functools.cache(measure)  # for the tests: each compile once per process, nothing on disk


def _compile_and_measure(
    m: Measure, target_name: str, tx: optax.GradientTransformation, opts: OptionSet, shapes: dict, layout: str
) -> None:
    def sds(shp: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        sharding, _ = _param_sharding(target_name, layout, len(shp))
        return jax.ShapeDtypeStruct(shp, dtype, sharding=sharding)

    params = {k: sds(s, opts.param_dtype) for k, s in shapes.items()}
    grads = {k: sds(s, opts.grad_dtype) for k, s in shapes.items()}
    _, mesh = _param_sharding(target_name, layout, 2)
    explicit = mesh is not None and "explicit" in layout

    fused = opts.fused and m.tx_name == "adamx"

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        if fused:
            return adamx.fused.apply_gradients(tx, grads, state, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # an Auto mesh is set too, as a user of one does (`jax.set_mesh`; adamx reads it: docs/performance.md)
    ctx = jax.set_mesh(mesh) if mesh is not None else _null()
    with ctx:
        abstract_state = jax.eval_shape(tx.init, params)
        if layout == "single":
            dev = SingleDeviceSharding(topology(target_name).devices[0])
            state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_state)
        elif not explicit:
            # Auto axes: the state's placement is left to XLA's sharding propagation through the step
            state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_state)
        else:
            init = jax.jit(tx.init).lower(params).compile()
            # a leaf that init makes from constants alone (the step count) comes back on the host's
            # default device: it is replicated over the mesh
            assert mesh is not None
            on_mesh = lambda s: s if isinstance(s, NamedSharding) else NamedSharding(mesh, P())  # noqa: E731
            state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_mesh(s)),
                abstract_state,
                init.output_shardings,
            )
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        if layout != "single" and not explicit:
            state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, compiled.input_shardings[0][1]
            )

    n_dev = 1 if layout == "single" else 4
    per_device = m.n_params / n_dev
    text = compiled.as_text() or ""
    ks = kernels(text)
    smallest = min(math.prod(x) for x in shapes.values()) / n_dev
    own = sum(k.bytes for k in ks)
    xla = xla_bytes_accessed(text)
    if TARGETS[target_name].is_gpu:
        m.bytes_per_param = own / per_device
        m.xla_bytes_per_param = None if xla is None else xla / per_device
    else:
        cost: Any = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        tpu = float(cost["bytes accessed"]) / per_device
        if any(k.opcode == "custom-call" and k.bytes >= smallest for k in ks):
            # a Pallas kernel: the cost model does not see inside a custom call (it counts ~0), so our
            # count of its operands and outputs is the figure, the cost model's the check
            m.bytes_per_param, m.xla_bytes_per_param = own / per_device, tpu
        else:  # the TPU's own figure first, our kernel count as the check
            m.bytes_per_param, m.xla_bytes_per_param = tpu, own / per_device
    m.ideal_per_param = (2 * _tree_bytes(params) + 2 * _tree_bytes(state) + _tree_bytes(grads)) / m.n_params
    memory: Any = compiled.memory_analysis()
    m.temp_per_param = memory.temp_size_in_bytes / per_device
    m.kernels_per_leaf = sum(k.bytes >= smallest for k in ks) / m.n_leaves
    m.state_bytes = _tree_bytes(state)
    m.collectives = collectives(text)
    if layout != "single":
        m.state_split, m.state_split_detail = _state_split(params, state, compiled)


def _state_split(params: dict, state: Any, compiled: Any) -> tuple[bool, str]:
    """Is every state leaf of a params leaf's size split 4 ways like it, as the step takes and returns it?

    The state the step takes is ``init``'s on an Explicit mesh, XLA's choice on an Auto one.
    A leaf counts when it has at least a quarter of the smallest split param's elements (codes,
    moments, compensation; not block scales or scalars): it must hold 1/4 of its elements on each
    device; where its shape equals the param's, its spec must equal the param's too.
    """
    split = [p for p in params.values() if _shard_elems(p) < int(np.prod(p.shape))]
    if not split:
        return True, "no param is split"
    smallest = min(int(np.prod(p.shape)) for p in split)
    out_state = compiled.output_shardings[1]
    bad: list[str] = []
    checked = 0
    for (path, leaf), out_sharding in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(out_state, is_leaf=lambda x: x is None)
    ):
        size = int(np.prod(leaf.shape))
        if size * 4 < smallest:
            continue
        checked += 1
        name = jax.tree_util.keystr(path)
        for when, sharding in (("state in", leaf.sharding), ("state out", out_sharding)):
            if sharding is None:
                continue
            if int(np.prod(sharding.shard_shape(leaf.shape))) * 4 != size:
                bad.append(f"{name} ({when}: {sharding.spec if hasattr(sharding, 'spec') else sharding})")
            else:
                key = next((k for k in params if k in name), None)
                p = params.get(key) if key else None
                if p is not None and p.shape == leaf.shape and not sharding.is_equivalent_to(p.sharding, leaf.ndim):
                    bad.append(f"{name} ({when}: {sharding.spec} vs params {p.sharding.spec})")
    if bad:
        return False, f"{len(bad)} of {2 * checked} not split like params: " + "; ".join(bad[:3])
    return True, f"{checked} leaves split like params"


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ------------------------------------------------------------------ the tables


def goals(m: Measure, peer: Measure, f32: Measure | None) -> dict[str, bool]:
    """Issue 21/24's goals for one row: bytes (1.15x ideal or <= optax), temporaries, 8-bit vs float32 Adam."""
    g = {
        "bytes": m.error is None
        and (m.bytes_per_param <= 1.15 * m.ideal_per_param or m.bytes_per_param <= peer.bytes_per_param),
        "temporaries": m.error is None and m.temp_per_param <= 0.5,
    }
    if m.option in CODED and f32 is not None:
        g["8-bit <= 0.75x float32 bytes"] = m.error is None and m.bytes_per_param <= 0.75 * f32.bytes_per_param
    return g


def run(targets: Sequence[str], option_sets: Sequence[str], gpt2: bool, log: Callable[[str], None]) -> dict:
    rows: list[dict] = []
    for t in targets:
        topology(t)
        for layout in _layouts(TARGETS[t]):
            f32 = None
            for o in option_sets:
                mine = measure(t, o, layout=layout)
                peer = measure(t, o, layout=layout, peer=True)
                if o == "float32":
                    f32 = mine
                row: dict[str, Any] = {
                    "adamx": dataclasses.asdict(mine),
                    "peer": dataclasses.asdict(peer),
                    "goals": goals(mine, peer, f32),
                }
                rows.append(row)
                log(_row_line(mine, peer))
        if gpt2:
            base = measure(t, "float32", shape="GPT-2 small", peer=True)
            log(_row_line(base, base))
            for o in option_sets:
                mine = measure(t, o, shape="GPT-2 small")
                peer = measure(t, o, shape="GPT-2 small", peer=True) if o != "float32" else base
                ratio = mine.state_plus_temp / base.state_plus_temp
                row = {
                    "adamx": dataclasses.asdict(mine),
                    "peer": dataclasses.asdict(peer),
                    "optax_f32_state_plus_temp": base.state_plus_temp,
                    "state_plus_temp_vs_optax_f32": ratio,
                    "goals": goals(mine, peer, None),
                }
                rows.append(row)
                log(_row_line(mine, peer) + f"  state+temp {ratio:.2f}x optax f32")
    return {"rows": rows}


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _row_line(m: Measure, peer: Measure) -> str:
    if m.error:
        return f"{m.target:8} {m.layout:17} {m.shape:12} {m.option:22} ERROR {m.error}"
    return (
        f"{m.target:8} {m.layout:17} {m.shape:12} {m.option:22} {_fmt(m.bytes_per_param)} B/param "
        f"(ideal {_fmt(m.ideal_per_param, 2)}, {peer.tx_name} {_fmt(peer.bytes_per_param)}) "
        f"temp {_fmt(m.temp_per_param, 2)} kernels/leaf {_fmt(m.kernels_per_leaf)} {m.compile_s:.1f}s"
    )


def markdown(result: dict) -> str:
    info = result["machine"]
    lines = [
        "# The accelerator check: the step compiled deviceless (issues 21, 24)",
        "",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']}, {info['cores']} cores; Python {info['python']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "  ",
        f"Date: {info['date']}; total {result['seconds']:.0f} s",
        "",
        "`jax.jit(update + optax.apply_updates, donate_argnums=(params, state))` compiled for each target with",
        "`ShapeDtypeStruct` arguments (rows named `apply_gradients`: `jax.jit(opt.apply_gradients)`, the Pallas",
        "kernels); optax's same step beside each row. B/param: TPU = the TPU compiler's `cost_analysis()` bytes",
        "accessed, GPU = our count of each kernel's operand + output bytes in device memory in the optimized HLO",
        "(the `check` column is the other count: XLA's HLO cost analysis on GPU, our kernel count on TPU). A",
        "Pallas kernel is a custom call that neither cost analysis sees into: there our count is the figure on",
        "both. Ideal: each byte of params, grads and state read once, each byte of params and state written",
        "once. temp: `memory_analysis()` temporaries per param. Mesh layouts: per device (under Auto axes the",
        "split is not known while tracing, so `apply_gradients` takes `update` + `apply_updates` there).",
        "Goals (issue 21): B/param <= 1.15x ideal or <= optax; temp <= 0.5; 8-bit <= 0.75x float32 Adam.",
        "",
    ]
    current = None
    for row in result["rows"]:
        m, p = row["adamx"], row["peer"]
        key = (m["target"], m["shape"], m["layout"])
        if key != current:
            current = key
            gpt2 = m["shape"] == "GPT-2 small"
            lines += [
                "",
                f"## {m['target']}, {m['shape']}, {m['layout']}",
                "",
                "| option set | B/param | check | ideal | optax peer | peer B/param | temp/param | kernels/leaf |"
                + (" state+temp vs optax f32 |" if gpt2 else " collectives | state split like params |")
                + " goals met |",
                "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpt2 else "---|---|"),
            ]
        goals_txt = ", ".join(k for k, ok in row["goals"].items() if not ok)
        goals_txt = "all" if not goals_txt else f"**no**: {goals_txt}"
        if m["error"]:
            cells = [
                m["option"],
                f"**compile error**: {m['error'][:160]}",
                "",
                "",
                p["tx_name"],
                _fmt(p["bytes_per_param"]),
            ]
            cells += ["", ""] + ([""] if m["shape"] == "GPT-2 small" else ["", ""]) + [goals_txt]
        else:
            cells = [
                m["option"],
                _fmt(m["bytes_per_param"]),
                _fmt(m["xla_bytes_per_param"]),
                _fmt(m["ideal_per_param"], 2),
                p["tx_name"],
                _fmt(p["bytes_per_param"]) if not p["error"] else "error",
                _fmt(m["temp_per_param"], 2),
                _fmt(m["kernels_per_leaf"]),
            ]
            if m["shape"] == "GPT-2 small":
                cells.append(f"{row['state_plus_temp_vs_optax_f32']:.2f}x")
            else:
                cells.append("; ".join(m["collectives"]) or "none")
                cells.append(
                    "-"
                    if m["state_split"] is None
                    else ("yes" if m["state_split"] else f"**no** ({m['state_split_detail'][:120]})")
                )
            cells.append(goals_txt)
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    import datetime

    return {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {**plugin_versions(), "adamx": metadata.version("adamx")},
        "command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the main option sets (float32, the moment formats, Kahan, stochastic), no GPT-2-shaped tree",
    )
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accelerator"), help="output path without suffix")
    args = ap.parse_args(argv)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    option_sets = QUICK_OPTION_SETS if args.quick else tuple(OPTION_SETS)
    t0 = time.perf_counter()
    result = run(targets, option_sets, gpt2=not args.quick, log=lambda s: print(s, flush=True))
    result["seconds"] = time.perf_counter() - t0
    result["machine"] = machine_info()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(f"wrote {args.out}.md and .json ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
