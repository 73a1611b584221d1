"""Grouped convolution with narrow groups packed into 128-lane blocks (TPU).

ResNeXt's 3x3 convs (``feature_group_count`` = 32 or 64) have 4 to 32 input
channels per group. XLA's TPU compiler lays each group out on the 128-wide
vector lanes, so a group of 4 channels occupies a whole lane tile: compiled
deviceless for a v5e chip, one X-101-64x4d layer1 conv (2 x 200 x 336 x 256
bfloat16, a 66 MiB activation) needs 4,200 MiB of temporaries (64x the
activation), layer2 (8 channels per group) 32x, layer3 (16) 16x, layer4
(32) none; the full X-101-64x4d train step at 2 images per chip needed
16.45 GiB of a v5e's 16 (BENCHMARKS.md, "TPU v5e").

Packing ``s`` neighbouring groups into one block of ``s x group width <=
128`` input channels with a block-diagonal kernel (zeros between the groups)
computes the same convolution with ``groups / s`` groups that fill the lanes:
no padded temporaries, the same weights and parameter shapes (the kernel is
expanded inside the program, so checkpoints and the converter are
unaffected), and gradients reach only the diagonal blocks. XLA counts the
zero products as FLOPs (64x4d layer1: 79 instead of 2.5 GFLOP per conv for 2
images); the matrix unit processes a lane tile either way. Results equal the
grouped convolution up to float summation order (the extra terms are exact
zeros).

Used by ``modeling.layers.conv`` for every conv with ``groups > 1``; packing
is on when ``jax.default_backend()`` is a TPU (``benchmarks/aot.py`` turns
it on for ``--target=tpu``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

LANES = 128
# Measured (module docstring): groups of 32 channels or more compile without
# padded temporaries on TPU v5e; narrower ones are packed.
MIN_NATIVE_GROUP_WIDTH = 32
# HWIO kernel layout (flax.linen.Conv): rhs_spec = (out, in, h, w) dims.
_HWIO_RHS_SPEC = (3, 2, 0, 1)


def _default_packing() -> bool:
  return jax.default_backend() == 'tpu'


packing_enabled = _default_packing  # benchmarks/aot.py sets it per target


def pack_factor(group_width: int, groups: int, lanes: int = LANES) -> int:
  """Groups per packed block: 1 (no packing) or the largest divisor ``s`` of
  ``groups`` with ``s * group_width <= lanes``, for groups narrower than
  ``MIN_NATIVE_GROUP_WIDTH`` input channels.

  E.g. X-101-64x4d: layer1 (4 channels x 64 groups) -> 32, layer3 (16 x 64)
  -> 8, layer4 (32 x 64) -> 1; X-101-32x4d layer1 (4 x 32) -> 32 (one dense
  block of 128 channels).
  """
  if groups <= 1 or group_width >= MIN_NATIVE_GROUP_WIDTH:
    return 1
  s = max(1, min(groups, lanes // group_width))
  while groups % s:
    s -= 1
  return s


def block_diagonal_kernel(kernel: jnp.ndarray, groups: int,
                          s: int) -> jnp.ndarray:
  """Packs a grouped HWIO kernel into ``groups / s`` blocks of ``s`` groups.

  Args:
    kernel: ``(kh, kw, group_width, out)`` kernel of a conv with ``groups``
      groups (output channels ``g * out/groups ...`` belong to group g, as
      in ``lax.conv_general_dilated`` / ``torch.nn.Conv2d``).
    groups: the conv's ``feature_group_count``.
    s: groups per block (``pack_factor``); must divide ``groups``.

  Returns:
    ``(kh, kw, s * group_width, out)``, same dtype: within block G, input
    channels ``a * group_width + c`` (group ``G*s + a``) connect only to the
    output channels of group ``G*s + a``; every other entry is 0.
  """
  kh, kw, width, out = kernel.shape
  if groups % s or out % groups:
    raise ValueError(f'cannot pack {groups} groups of {out // groups} '
                     f'outputs into blocks of {s}')
  k6 = kernel.reshape(kh, kw, width, groups // s, s, out // groups)
  eye = jnp.eye(s, dtype=kernel.dtype)
  packed = jnp.einsum('hwcgbo,ab->hwacgbo', k6, eye)
  return packed.reshape(kh, kw, s * width, out)


def conv_general_dilated(lhs: jnp.ndarray, rhs: jnp.ndarray,
                         window_strides: Any, padding: Any,
                         lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         precision: Any = None, **kwargs) -> jnp.ndarray:
  """``lax.conv_general_dilated``, packing narrow groups when enabled.

  Same arguments and result as ``lax.conv_general_dilated`` (it is
  ``flax.linen.Conv``'s ``conv_general_dilated`` hook). With
  ``packing_enabled()`` and an HWIO kernel whose groups are narrower than
  ``MIN_NATIVE_GROUP_WIDTH``, the kernel is expanded with
  ``block_diagonal_kernel`` and the conv runs with ``groups / s`` groups.
  """
  groups = feature_group_count
  if groups > 1 and packing_enabled():
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if tuple(dn.rhs_spec) == _HWIO_RHS_SPEC:
      s = pack_factor(rhs.shape[2], groups)
      if s > 1:
        rhs = block_diagonal_kernel(rhs, groups, s)
        groups //= s
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=groups, precision=precision, **kwargs)
