r"""Moment storage as a plug-in: the codecs of ``adamx.adam(quantize_moments=True, moment_format=...)``.

A :class:`MomentCodec` says how one moment leaf (``mu``, ``nu`` or ``nu_max`` of one params leaf)
is stored: which leaves it takes (:meth:`~MomentCodec.applies`), its zero state, ``encode`` of
float32 moments, ``decode`` back to float32, the state layout (:meth:`~MomentCodec.state_shapes`,
for checks and restore targets) and its bytes. The step (``adamx._step.moments_coded``) is written
once against this interface: decode, the float32 Adam step, encode. Every state leaf is a
:class:`adamx.QuantizedArray` ``(codes, scales)``; the float32/bfloat16 moments have no codec
(their arrays are the state), so the float steps do not change.

The formats (:data:`FORMATS`, the values of ``moment_format``):

.. code-block:: text

    format     codes                                   scales (float32)               B/param, both moments
    dynamic8   uint8, the param's shape                scale_shape(shape, block)       2.03 (block 256)
    fp8        float8_e4m3fn, the param's shape         [size // 256]                   2.03
    4bit       uint8[size // 2], two codes per byte     [size // 128]                   1.06

* ``dynamic8`` (:class:`Dynamic8`): bitsandbytes' dynamic maps, signed for ``mu``, unsigned for
  ``nu``/``nu_max``, ``quantize_block_size`` blocks (adamx/_quantize.py). The default; the fused
  C++ kernel's 8-bit call runs it (``kernel="dynamic8"``).
* ``fp8`` (:class:`Fp8`): torchao's ``AdamFp8``, e4m3fn codes with one scale per 256 elements.
* ``4bit`` (:class:`Nibble4`): torchao's ``Adam4bit``, block 128: the signed 3-exponent map for
  ``mu``, ``k/16`` (no zero) for ``nu``/``nu_max``. **Packed layout**: the codes of the row-major
  flattening, two per byte, ``byte[k] = code[2k] << 4 | code[2k+1]`` (torchao's order), as a 1-D
  ``uint8[size // 2]``; ``scales[b]`` is the absmax of elements ``128 b .. 128 b + 127``.

The fused kernel runs fp8 and 4bit too (``kernel="fp8"`` / ``"4bit"``: its low-bit call, with the
codecs of adamx/_lowbit.h), bit for bit as ``update`` (tests/test_lowbit_fused.py).

fp8 and 4bit take a leaf as torchao does (:func:`adamx._lowbit.quantizes`): at least
``quantize_min_size`` elements (default 4096, torchao's) and a whole number of blocks; other
leaves keep float moments. Their codes equal torchao's bit for bit (adamx/_lowbit.py).

A new format is one class here and one :func:`register` call (docs/architecture.md,
"How to add a codec"); ``moment_format`` accepts every registered name.

Example:
  >>> import jax.numpy as jnp
  >>> c = codec("4bit", "nu", block_size=256, min_size=4096)
  >>> c.applies((64, 64)), c.applies((33, 100)), c.nbytes((64, 64))
  (True, False, 2176)
  >>> s = c.encode(jnp.ones((64, 64)))
  >>> s.codes.shape, s.scales.shape, float(c.decode(s, (64, 64))[0, 0])
  ((2048,), (32,), 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from adamx import _lowbit, _quantize
from adamx._quantize import QuantizedArray
from adamx._types import Leaf

Shape = tuple[int, ...]


def _shape(shape_or_leaf: Leaf) -> Shape:
    if hasattr(shape_or_leaf, "shape"):
        return tuple(int(d) for d in shape_or_leaf.shape)
    return tuple(int(d) for d in shape_or_leaf)


def abstract(codes: jax.ShapeDtypeStruct, scales: jax.ShapeDtypeStruct) -> QuantizedArray:
    """A :class:`adamx.QuantizedArray` of abstract leaves (a state layout, an Orbax restore target)."""
    return QuantizedArray(codes, scales)  # type: ignore[arg-type]  # ShapeDtypeStruct leaves by design


class MomentCodec(Protocol):
    """How one moment leaf is stored (see the module docstring). Implementations are frozen dataclasses."""

    @property
    def name(self) -> str:
        """The ``moment_format`` value that selects this codec."""
        ...

    @property
    def kernel(self) -> str | None:
        """The fused kernel's tag for this codec (``None``: not fused, the reference step runs)."""
        ...

    def applies(self, shape: Shape) -> bool:
        """Whether a params leaf of ``shape`` gets coded moments (else float moments)."""
        ...

    def zeros(self, leaf: Leaf) -> QuantizedArray:
        """The state of a zero moment for ``leaf`` (an array, its sharding followed, or a ShapeDtypeStruct)."""
        ...

    def encode(self, x: jax.Array) -> QuantizedArray:
        """The state holding the float32 moment ``x``."""
        ...

    def decode(self, state: QuantizedArray, shape: Shape) -> jax.Array:
        """The float32 moment of shape ``shape`` that ``state`` holds."""
        ...

    def state_shapes(self, shape: Shape) -> QuantizedArray:
        """``QuantizedArray`` of ``jax.ShapeDtypeStruct`` s: the state layout of a leaf of ``shape``."""
        ...

    def nbytes(self, shape: Shape) -> int:
        """Bytes of the state of a leaf of ``shape`` (codes and scales)."""
        ...


class _Blockwise:
    """Shared parts: zero codes and scales (what torchao starts from), bytes from the layout."""

    def state_shapes(self, shape: Shape) -> QuantizedArray:
        raise NotImplementedError

    def zeros(self, leaf: Leaf) -> QuantizedArray:
        """Zero codes and scales; for an array ``leaf``, those of its shape split like it and the 1-D
        ones split along its major axis where it is split there alone (:func:`adamx._quantize.major_split`:
        as the step's encode returns them, so the state keeps one sharding from step to step)."""
        s = self.state_shapes(_shape(leaf))

        def zeros(a: Any) -> jax.Array:  # a ShapeDtypeStruct
            if isinstance(leaf, jax.Array) and tuple(a.shape) == tuple(leaf.shape):
                return jnp.zeros_like(leaf, a.dtype)
            if isinstance(leaf, jax.Array) and len(a.shape) == 1:
                return jnp.zeros(a.shape, a.dtype, out_sharding=_quantize.major_split(leaf, a.shape[0]))
            return jnp.zeros(a.shape, a.dtype)

        return QuantizedArray(zeros(s.codes), zeros(s.scales))

    def nbytes(self, shape: Shape) -> int:
        s = self.state_shapes(tuple(shape))
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in s)


@dataclasses.dataclass(frozen=True)
class Dynamic8(_Blockwise):
    """bitsandbytes' 8-bit dynamic map (``quantize_moments=True``'s default format), via adamx/_quantize.py."""

    signed: bool
    block_size: int = _quantize.DEFAULT_BLOCK_SIZE
    min_size: int = 4096
    name: ClassVar[str] = "dynamic8"
    kernel: ClassVar[str | None] = "dynamic8"

    @property
    def code(self) -> Leaf:
        """The 256-value map: signed for ``mu``, unsigned for ``nu``/``nu_max``."""
        return _quantize.SIGNED_DYNAMIC_MAP if self.signed else _quantize.UNSIGNED_DYNAMIC_MAP

    def applies(self, shape: Shape) -> bool:
        return math.prod(shape) >= self.min_size

    def zeros(self, leaf: Leaf) -> QuantizedArray:
        return _quantize.quantized_zeros(leaf, self.code, self.block_size)  # the code of 0 is not 0

    def encode(self, x: jax.Array, scales: jax.Array | None = None, lanes: bool = False) -> QuantizedArray:
        return _quantize.quantize(x, self.code, self.block_size, scales, lanes)

    def scales_of(self, x: jax.Array) -> jax.Array:
        """The scales :meth:`encode` gives ``x`` (its blocks' absmax), for a separate reduction pass."""
        # a float max and a NaN test (XLA:GPU fuses both into the reduction of their producer; the
        # integer max over the bits of block_absmax, it does not); a float max alone drops NaN on CPU
        b = _quantize.blocks_of(x.astype(jnp.float32), self.block_size)
        top = jnp.max(jnp.abs(b), axis=-1)
        top = jnp.where(jnp.any(jnp.isnan(b), axis=-1), jnp.float32(jnp.nan), top)
        return jnp.where(top < _quantize.FLT_MIN, jnp.float32(0), top)

    def decode(self, state: QuantizedArray, shape: Shape, lookup: str | None = None) -> jax.Array:
        return _quantize.dequantize(state, self.code, shape, self.block_size, lookup=lookup)  # also 1-D

    def state_shapes(self, shape: Shape) -> QuantizedArray:
        ss = _quantize.scale_shape(shape, self.block_size)
        return abstract(jax.ShapeDtypeStruct(shape, jnp.uint8), jax.ShapeDtypeStruct(ss, jnp.float32))


class _WholeBlocks(_Blockwise):
    """torchao's rule (:func:`adamx._lowbit.quantizes`, with ``min_size`` for its 4096): a whole number of blocks."""

    min_size: int
    block_size: int

    def applies(self, shape: Shape) -> bool:
        n = math.prod(shape)
        return n > 0 and n >= self.min_size and n % self.block_size == 0


@dataclasses.dataclass(frozen=True)
class Fp8(_WholeBlocks):
    """torchao ``AdamFp8``: e4m3fn codes in the param's shape, ``scales[size // block_size]`` (adamx/_lowbit.py)."""

    block_size: int = _lowbit.FP8_BLOCK_SIZE
    min_size: int = _lowbit.MIN_QUANTIZED_SIZE
    name: ClassVar[str] = "fp8"
    kernel: ClassVar[str | None] = "fp8"

    def encode(self, x: jax.Array) -> QuantizedArray:
        codes, scales = _lowbit.fp8_encode(x, self.block_size)
        return QuantizedArray(_quantize._like(codes, x), scales)  # split like the param on an Explicit mesh

    def decode(self, state: QuantizedArray, shape: Shape) -> jax.Array:
        return _lowbit._reshape(_lowbit.fp8_decode(state.codes, state.scales), shape)

    def state_shapes(self, shape: Shape) -> QuantizedArray:
        n = math.prod(shape)
        return abstract(
            jax.ShapeDtypeStruct(tuple(shape), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((n // self.block_size,), jnp.float32),
        )


@dataclasses.dataclass(frozen=True)
class Nibble4(_WholeBlocks):
    """torchao ``Adam4bit``: packed 4-bit codes ``uint8[size // 2]``, ``scales[size // 128]`` (adamx/_lowbit.py).

    ``signed_m``: the first moment's signed dynamic map (:data:`adamx._lowbit.M4_MAP`); else the second
    moment's ``k/16`` map (:data:`adamx._lowbit.V4_MAP`).
    """

    signed_m: bool
    min_size: int = _lowbit.MIN_QUANTIZED_SIZE
    block_size: int = _lowbit.Q4_BLOCK_SIZE
    name: ClassVar[str] = "4bit"
    kernel: ClassVar[str | None] = "4bit"

    def encode(self, x: jax.Array, scales: jax.Array | None = None, lanes: bool = False) -> QuantizedArray:
        """``scales``: :meth:`scales_of` ``x`` from a pass of its own (the GPU's two-pass schedule,
        ``adamx._step.moments_coded``): then the codes are elementwise and packed in the same
        kernel. ``lanes`` (the TPU schedule's flag) changes nothing here."""
        enc = _lowbit.m4_encode if self.signed_m else _lowbit.v4_encode
        codes, new = enc(x, self.block_size, scales)
        return QuantizedArray(_lowbit.pack4(codes, fused=scales is not None), new)

    def scales_of(self, x: jax.Array) -> jax.Array:
        """The scales :meth:`encode` gives ``x`` (:func:`adamx._lowbit.q4_scales`)."""
        return _lowbit.q4_scales(x, self.block_size)

    def decode(self, state: QuantizedArray, shape: Shape, lookup: str | None = None) -> jax.Array:
        """``lookup``: the GPU's two passes (``"table"``, ``"arithmetic"``) unpack elementwise
        (:func:`adamx._lowbit.unpack4` ``fused``); the same codes either way."""
        dec = _lowbit.m4_decode if self.signed_m else _lowbit.v4_decode
        fused = lookup in ("table", "arithmetic")
        return dec(_lowbit.unpack4(state.codes, shape, fused=fused), state.scales)

    def state_shapes(self, shape: Shape) -> QuantizedArray:
        n = math.prod(shape)
        return abstract(
            jax.ShapeDtypeStruct((n // 2,), jnp.uint8), jax.ShapeDtypeStruct((n // self.block_size,), jnp.float32)
        )


# (signed first moment?, quantize_block_size, quantize_min_size) -> the codec of one moment field
CodecFactory = Callable[[bool, int, int], MomentCodec]


@dataclasses.dataclass(frozen=True)
class Format:
    """A registered ``moment_format``: how to build its codecs, and what it needs from the other options.

    ``block_size``: the format's fixed block (``None``: it takes ``quantize_block_size``).
    ``flat``: it can sit in ``flat_state=True`` buffers (codes in the param's shape, uint8).
    """

    make: CodecFactory
    block_size: int | None = None
    flat: bool = False


FORMATS: dict[str, Format] = {
    "dynamic8": Format(lambda signed, bs, ms: Dynamic8(signed, bs, ms), None, flat=True),
    "fp8": Format(lambda signed, bs, ms: Fp8(_lowbit.FP8_BLOCK_SIZE, ms), _lowbit.FP8_BLOCK_SIZE),
    "4bit": Format(lambda signed, bs, ms: Nibble4(signed, ms), _lowbit.Q4_BLOCK_SIZE),
}
"""Every ``moment_format`` by name (:func:`register` adds one)."""


def register(name: str, fmt: Format) -> None:
    """Make ``moment_format=name`` select ``fmt`` (a ``ValueError`` if the name is taken)."""
    if name in FORMATS:
        raise ValueError(f"moment format {name!r} is already registered")
    FORMATS[name] = fmt


def unregister(name: str) -> None:
    """Remove a format added by :func:`register` (the three built-in ones stay)."""
    if name in ("dynamic8", "fp8", "4bit"):
        raise ValueError(f"moment format {name!r} is built in")
    FORMATS.pop(name, None)


def check_format(name: str, value: object) -> None:
    """``value`` must be a registered format name: a ``ValueError`` naming the argument ``name`` otherwise."""
    if not isinstance(value, str) or value not in FORMATS:
        raise ValueError(f"`{name}` must be one of {tuple(FORMATS)}, got {value!r}.")


def codec(fmt: str, field: str, block_size: int, min_size: int) -> MomentCodec:
    """The codec of state field ``field`` (``"mu"``: the signed map; ``"nu"``/``"nu_max"``) in format ``fmt``."""
    check_format("moment_format", fmt)
    return FORMATS[fmt].make(field == "mu", int(block_size), int(min_size))
