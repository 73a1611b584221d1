"""FPN neck as mmdetection 2.x builds it for MS R-CNN (spec §1.4).

``lateral_convs_i/conv`` (1x1) and ``fpn_convs_i/conv`` (3x3, pad 1), with
bias, no norm, no activation; nearest 2x top-down upsampling; P6 =
``max_pool2d(P5, kernel 1, stride 2)`` = ``P5[:, ::2, ::2]``.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import flax.linen as nn
import jax.numpy as jnp

from msrcnn_jax.modeling import layers
from msrcnn_jax.ops import padding


def upsample_nearest_2x(x: jnp.ndarray) -> jnp.ndarray:
  """``(B, H, W, C) -> (B, 2H, 2W, C)`` by repetition.

  mmdetection calls ``F.interpolate(size=prev_shape, mode='nearest')``; with
  every level an exact halving (/32 padding) that is a 2x repeat.
  """
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
  """Feature pyramid over C2..C5, producing P2..P6.

  Attributes:
    in_channels: channels of C2..C5.
    out_channels: channels of every P level.
    num_outs: 5 (P2..P6); extra levels beyond P5 are stride-2 subsamplings.
    dtype: computation dtype.
  """
  in_channels: Sequence[int]
  out_channels: int = 256
  num_outs: int = 5
  dtype: Any = jnp.float32

  def setup(self):
    n = len(self.in_channels)
    self.lateral_convs = [
        layers.ConvModule(self.out_channels, 1, relu=False,
                          kernel_init=layers.XAVIER_UNIFORM, dtype=self.dtype)
        for _ in range(n)]
    self.fpn_convs = [
        layers.ConvModule(self.out_channels, 3, relu=False,
                          kernel_init=layers.XAVIER_UNIFORM, dtype=self.dtype)
        for _ in range(n)]

  def __call__(self, feats: Sequence[jnp.ndarray],
               valid_hw: jnp.ndarray) -> List[jnp.ndarray]:
    """Computes P2..P6.

    Args:
      feats: ``[C2, C3, C4, C5]``, ``(B, H/s, W/s, C_i)`` for s = 4..32, zero
        beyond ``padding.valid_size(valid_hw, s)``; H, W multiples of 32.
      valid_hw: ``(B, 2)`` int32 ``pad_shape`` of each image.

    Returns:
      ``[P2, ..., P6]``, ``(B, H/s, W/s, out_channels)`` for s = 4..64
      (P6 ``ceil(H/64)``), zero beyond ``padding.valid_size(valid_hw, s)``.
    """
    n = len(self.in_channels)
    if len(feats) != n:
      raise ValueError(f'expected {n} feature maps, got {len(feats)}')
    for hi, lo in zip(feats[:-1], feats[1:]):
      if hi.shape[1:3] != (2 * lo.shape[1], 2 * lo.shape[2]):
        # mmdetection interpolates to the finer size; with /32 padding that
        # is an exact 2x repeat, which is all we implement.
        raise ValueError('FPN needs every level exactly 2x the next (input '
                         f'padded to a multiple of 32); got {hi.shape} and '
                         f'{lo.shape}')
    strides = [4 * 2**i for i in range(self.num_outs)]
    laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
    for i in range(n - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + upsample_nearest_2x(laterals[i])
    outs = []
    for i in range(n):
      valid = padding.valid_size(valid_hw, strides[i])
      # The 3x3 conv must see PyTorch's zero padding at the image's edge.
      p = self.fpn_convs[i](layers.mask_invalid(laterals[i], valid))
      outs.append(layers.mask_invalid(p, valid))
    for i in range(n, self.num_outs):
      # max_pool2d(kernel 1, stride 2): plain subsampling (spec §5.8).
      outs.append(outs[-1][:, ::2, ::2, :])
    return outs
