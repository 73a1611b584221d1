"""ResNet / ResNeXt backbone as mmdetection 2.x builds it (spec §1.2, §4.1-4.2).

Module and parameter names follow mmdetection's keys with '.N' -> '_N':
``conv1``, ``bn1``, ``layer{L}_{b}`` with ``conv1..3``, ``bn1..3`` and, in
block 0, ``downsample_0`` (1x1 conv) / ``downsample_1`` (BN).
"""

from __future__ import annotations

import math
import re
from typing import Any, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrcnn_jax.modeling import layers
from msrcnn_jax.ops import padding

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4
_LAYER_RE = re.compile(r'^layer(\d+)_\d+$')


def bottleneck_width(planes: int, groups: int, base_width: int,
                     base_channels: int) -> int:
  """Inner width of a bottleneck (mmdet ``resnext.py`` Bottleneck).

  ``planes`` for ResNet; ``floor(planes * base_width / base_channels) *
  groups`` for ResNeXt (groups > 1), e.g. 128 for 32x4d layer1.
  """
  if groups == 1:
    return planes
  return math.floor(planes * (base_width / base_channels)) * groups


class Bottleneck(nn.Module):
  """conv1 1x1 -> BN -> ReLU -> conv2 3x3 -> BN -> ReLU -> conv3 1x1 -> BN,
  + identity / downsample, ReLU.

  Attributes:
    planes: stage planes; the block outputs ``4 * planes`` channels.
    width: inner width (see ``bottleneck_width``).
    stride: 1 or 2. Caffe style puts it on conv1, pytorch style on conv2.
    style: 'caffe' or 'pytorch'.
    groups: conv2 groups (ResNeXt cardinality).
    use_downsample: whether the identity goes through downsample_0/1.
    bn_eps: BN eps.
    dtype: computation dtype.
    zero_init_residual: start bn3's scale at 0 so the block starts as the
      identity (training from scratch without batch statistics).
  """
  planes: int
  width: int
  stride: int = 1
  style: str = 'pytorch'
  groups: int = 1
  use_downsample: bool = False
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  zero_init_residual: bool = False

  def setup(self):
    s1, s2 = ((self.stride, 1) if self.style == 'caffe' else (1, self.stride))
    out = self.planes * EXPANSION
    self.conv1 = layers.conv(self.width, 1, s1, use_bias=False,
                             dtype=self.dtype)
    self.bn1 = layers.FrozenBatchNorm(self.bn_eps, self.dtype)
    self.conv2 = layers.conv(self.width, 3, s2, groups=self.groups,
                             use_bias=False, dtype=self.dtype)
    self.bn2 = layers.FrozenBatchNorm(self.bn_eps, self.dtype)
    self.conv3 = layers.conv(out, 1, use_bias=False, dtype=self.dtype)
    self.bn3 = layers.FrozenBatchNorm(self.bn_eps, self.dtype,
                                      zero_scale=self.zero_init_residual)
    if self.use_downsample:
      # A list attribute: Flax names its items downsample_0, downsample_1.
      self.downsample = [
          layers.conv(out, 1, self.stride, use_bias=False, dtype=self.dtype),
          layers.FrozenBatchNorm(self.bn_eps, self.dtype)]

  def __call__(self, x: jnp.ndarray, valid_in: jnp.ndarray,
               valid_out: jnp.ndarray) -> jnp.ndarray:
    """Runs the block.

    Args:
      x: ``(B, H, W, C_in)``; values beyond ``valid_in`` are arbitrary.
      valid_in: ``(B, 2)`` valid size of x.
      valid_out: ``(B, 2)`` valid size of the output.

    Returns:
      ``(B, H/stride, W/stride, 4 * planes)``, arbitrary beyond valid_out.
    """
    # 1x1 convs (also strided, pad 0) only read valid positions for valid
    # outputs; only the 3x3 conv2 must see zeros beyond the valid region.
    y = nn.relu(self.bn1(self.conv1(x)))
    y = layers.mask_invalid(y, valid_out if self.style == 'caffe'
                            else valid_in)
    y = nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    identity = x
    if self.use_downsample:
      identity = self.downsample[1](self.downsample[0](x))
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """mmdetection ResNet/ResNeXt with ``out_indices=(0, 1, 2, 3)``.

  Attributes:
    depth: 50 or 101.
    style: 'caffe' (stride on conv1 of block 0) or 'pytorch' (on conv2).
    groups: ResNeXt cardinality (1 = ResNet).
    base_width: ResNeXt width per group (4 for x101_*x4d).
    base_channels: stem channels and layer1 planes (64 released).
    frozen_stages: the stem and layers 1..frozen_stages get no gradient
      (``jax.lax.stop_gradient`` on their outputs).
    bn_eps: FrozenBatchNorm eps.
    dtype: computation dtype (parameters stay float32).
    zero_init_residual: see ``Bottleneck`` (from-scratch training only).
  """
  depth: int = 50
  style: str = 'pytorch'
  groups: int = 1
  base_width: int = 64
  base_channels: int = 64
  frozen_stages: int = 1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  zero_init_residual: bool = False

  def setup(self):
    if self.depth not in STAGE_BLOCKS:
      raise ValueError(f'depth must be 50 or 101, got {self.depth}')
    if self.style not in ('caffe', 'pytorch'):
      raise ValueError(f'style must be caffe or pytorch, got {self.style!r}')
    self.conv1 = layers.conv(self.base_channels, 7, 2, use_bias=False,
                             dtype=self.dtype)
    self.bn1 = layers.FrozenBatchNorm(self.bn_eps, self.dtype)
    stages = []
    for i, num_blocks in enumerate(STAGE_BLOCKS[self.depth]):
      planes = self.base_channels * 2**i
      width = bottleneck_width(planes, self.groups, self.base_width,
                               self.base_channels)
      stages.append([
          Bottleneck(planes=planes, width=width,
                     stride=(2 if (i > 0 and b == 0) else 1),
                     style=self.style, groups=self.groups,
                     use_downsample=(b == 0), bn_eps=self.bn_eps,
                     dtype=self.dtype,
                     zero_init_residual=self.zero_init_residual)
          for b in range(num_blocks)])
    # Lists assigned in setup are named layer1_0, layer1_1, ...
    self.layer1, self.layer2, self.layer3, self.layer4 = stages

  @staticmethod
  def stage_of(name: str) -> int | None:
    """The stage of a top-level parameter scope, for ``frozen_stages``
    (mmdet ``ResNet._freeze_stages``): 0 for the stem (``conv1``, ``bn1``),
    i for the blocks ``layer{i}_*``."""
    if name in ('conv1', 'bn1'):
      return 0
    found = _LAYER_RE.match(name)
    return int(found.group(1)) if found else None

  def __call__(self, x: jnp.ndarray,
               valid_hw: jnp.ndarray) -> List[jnp.ndarray]:
    """Computes C2..C5.

    Args:
      x: ``(B, H, W, 3)`` float32 normalised images, H and W multiples of 32
        (bucket shape), zero beyond each image's pad_shape.
      valid_hw: ``(B, 2)`` int32 ``pad_shape`` (h, w) of each image.

    Returns:
      ``[C2, C3, C4, C5]``, ``(B, H/s, W/s, C)`` for s = 4, 8, 16, 32 and
      C = 4 * base_channels * (1, 2, 4, 8); zero beyond
      ``padding.valid_size(valid_hw, s)``.
    """
    if x.shape[1] % 32 or x.shape[2] % 32:
      raise ValueError(f'input height and width must be multiples of 32 '
                       f'(size_divisor), got {x.shape}')
    x = layers.mask_invalid(x.astype(self.dtype), valid_hw)
    y = nn.relu(self.bn1(self.conv1(x)))
    # Zero beyond the valid region, not -inf: after the ReLU every value is
    # >= 0 and every pooling window of a valid output holds a valid pixel,
    # so a 0 there never wins a max and the valid outputs equal mmdetection's
    # (its -inf border padding). With -inf, windows wholly in the bucket
    # padding would stay -inf and turn layer1's kernel gradients into
    # -inf * 0 = NaN (issue 10).
    y = layers.mask_invalid(y, padding.valid_size(valid_hw, 2))
    y = layers.max_pool_3x3_s2(y)
    y = layers.mask_invalid(y, padding.valid_size(valid_hw, 4))
    if self.frozen_stages >= 0:
      # mmdet freezes the stem when frozen_stages >= 0.
      y = jax.lax.stop_gradient(y)
    outs = []
    valid = padding.valid_size(valid_hw, 4)
    stages: Sequence[Sequence[Bottleneck]] = (
        self.layer1, self.layer2, self.layer3, self.layer4)
    for i, blocks in enumerate(stages):
      for b, block in enumerate(blocks):
        valid_out = (padding.valid_size(valid_hw, 4 * 2**i)
                     if b == 0 else valid)
        y = block(y, valid, valid_out)
        valid = valid_out
      y = layers.mask_invalid(y, valid)
      if i + 1 <= self.frozen_stages:
        y = jax.lax.stop_gradient(y)
      outs.append(y)
    return outs


def resnet_from_config(cfg, dtype: Any = jnp.float32) -> ResNet:
  """The ResNet/ResNeXt of ``config.model.backbone``.

  Any backbone is a function ``(config.model.backbone, dtype) -> module``
  whose module maps ``(images (B, H, W, 3), pad_shape (B, 2))`` to
  ``[C2, C3, C4, C5]`` and has ``stage_of(name)`` (see ``ResNet.stage_of``);
  ``modeling/build.py`` passes it to the detector.
  """
  return ResNet(depth=cfg.depth, style=cfg.style, groups=cfg.groups,
                base_width=cfg.base_width, base_channels=cfg.base_channels,
                frozen_stages=cfg.frozen_stages, bn_eps=cfg.bn_eps,
                dtype=dtype, zero_init_residual=cfg.zero_init_residual)
