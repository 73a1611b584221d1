"""Anchors of mmdetection v2's ``AnchorGenerator`` (spec §1.5, §3.1).

Anchors are ``(x1, y1, x2, y2)`` float32 pixels at test scale (the resized
image), v2 convention: not rounded, centred on the grid point (centre offset
0). Per level the flattened order is ``(y, x, a)``: row-major over the
feature grid with the anchor index ``a`` innermost, ``a`` running over ratios
(outer) and scales (inner) as with ``scale_major=True``. Levels are
concatenated level-major.

Everything here depends only on static shapes, so it is computed with numpy
(bit-exact float32, as mmdetection's torch code) and enters jitted code as
constants. Valid flags depend on the per-image ``pad_shape`` and are jnp.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from msrcnn_jax.ops import padding

# mmdetection's released RPN anchor settings (spec §1.5).
DEFAULT_SCALES = (8,)
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_STRIDES = (4, 8, 16, 32, 64)


def base_anchors(stride: int, scales: Sequence[float] = DEFAULT_SCALES,
                 ratios: Sequence[float] = DEFAULT_RATIOS) -> np.ndarray:
  """Base anchors of one level, centred on (0, 0).

  Follows ``gen_single_level_base_anchors`` operation by operation in float32
  (base size = stride, ``h_ratio = sqrt(r)``, ``w_ratio = 1 / h_ratio``,
  ``w = (base * w_ratio) * scale``), so the values are bit-identical.

  Args:
    stride: level stride = base size in pixels.
    scales: anchor scales (octave scales), e.g. ``(8,)``.
    ratios: aspect ratios ``h / w``, e.g. ``(0.5, 1, 2)``.

  Returns:
    ``(len(ratios) * len(scales), 4)`` float32 ``(-w/2, -h/2, w/2, h/2)``,
    ratio-major, scale-minor.
  """
  ratios = np.asarray(ratios, np.float32)
  scales = np.asarray(scales, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  base = np.float32(stride)
  ws = ((base * w_ratios)[:, None] * scales[None, :]).reshape(-1)
  hs = ((base * h_ratios)[:, None] * scales[None, :]).reshape(-1)
  half = np.float32(0.5)
  zero = np.float32(0)
  return np.stack([zero - half * ws, zero - half * hs,
                   zero + half * ws, zero + half * hs], axis=-1)


def grid_anchors(base: np.ndarray, feat_hw: tuple[int, int],
                 stride: int) -> np.ndarray:
  """All anchors of one level in ``(y, x, a)`` order.

  Args:
    base: ``(A, 4)`` float32 base anchors (:func:`base_anchors`).
    feat_hw: ``(H, W)`` static feature map size.
    stride: level stride; the shift of grid cell (y, x) is ``(x*s, y*s)``.

  Returns:
    ``(H * W * A, 4)`` float32 anchors.
  """
  h, w = feat_hw
  shift_x = np.arange(w, dtype=np.float32) * np.float32(stride)
  shift_y = np.arange(h, dtype=np.float32) * np.float32(stride)
  xx, yy = np.meshgrid(shift_x, shift_y)  # (H, W), x fastest
  shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)
  return (base[None, :, :] + shifts).reshape(-1, 4).astype(np.float32)


def anchors_at(indices: jnp.ndarray, base: np.ndarray, feat_w: int,
               stride: int) -> jnp.ndarray:
  """Anchors at flat ``(y, x, a)`` indices, without materialising the grid.

  Bit-identical to ``grid_anchors(base, (H, feat_w), stride)[indices]``
  (the same float32 ``base + shift`` addition; shifts are exact integers).

  Args:
    indices: int ``(...)`` flat indices ``(y * feat_w + x) * A + a``.
    base: ``(A, 4)`` float32 base anchors.
    feat_w: static feature map width.
    stride: level stride.

  Returns:
    ``(..., 4)`` float32 anchors.
  """
  num_anchors = base.shape[0]
  indices = jnp.asarray(indices, jnp.int32)
  a = indices % num_anchors
  cell = indices // num_anchors
  sx = (cell % feat_w).astype(jnp.float32) * jnp.float32(stride)
  sy = (cell // feat_w).astype(jnp.float32) * jnp.float32(stride)
  shifts = jnp.stack([sx, sy, sx, sy], axis=-1)
  return jnp.asarray(base)[a] + shifts


def feature_sizes(bucket_hw: tuple[int, int],
                  strides: Sequence[int] = DEFAULT_STRIDES
                  ) -> list[tuple[int, int]]:
  """Static FPN feature sizes ``ceil(bucket / s)`` for a bucket shape."""
  h, w = (int(v) for v in bucket_hw)
  return [(padding.valid_size(h, s), padding.valid_size(w, s))
          for s in strides]


def multilevel_anchors(feat_sizes: Sequence[tuple[int, int]],
                       strides: Sequence[int] = DEFAULT_STRIDES,
                       scales: Sequence[float] = DEFAULT_SCALES,
                       ratios: Sequence[float] = DEFAULT_RATIOS
                       ) -> list[np.ndarray]:
  """Per-level anchors for static feature sizes.

  Args:
    feat_sizes: ``[(H_l, W_l)]`` per level (the bucket's feature sizes).
    strides, scales, ratios: anchor generator settings.

  Returns:
    list of ``(H_l * W_l * A, 4)`` float32 arrays; concatenate for mmdet's
    level-major ``anchors``.
  """
  return [grid_anchors(base_anchors(s, scales, ratios), hw, s)
          for hw, s in zip(feat_sizes, strides)]


def level_valid_flags(feat_hw: tuple[int, int], valid_hw: jnp.ndarray,
                      num_anchors: int) -> jnp.ndarray:
  """``single_level_valid_flags``: anchors whose cell is inside ``valid_hw``.

  Args:
    feat_hw: static ``(H, W)`` of the (bucket) feature map.
    valid_hw: ``(..., 2)`` int valid ``(h, w)`` per image (clipped to the
      map implicitly).
    num_anchors: anchors per cell ``A``.

  Returns:
    ``(..., H * W * A)`` bool in ``(y, x, a)`` order.
  """
  h, w = feat_hw
  valid_hw = jnp.asarray(valid_hw, jnp.int32)
  vy = jnp.arange(h, dtype=jnp.int32) < valid_hw[..., 0:1]  # (..., H)
  vx = jnp.arange(w, dtype=jnp.int32) < valid_hw[..., 1:2]  # (..., W)
  v = vy[..., :, None] & vx[..., None, :]  # (..., H, W)
  v = jnp.broadcast_to(v[..., None], v.shape + (num_anchors,))
  return v.reshape(v.shape[:-3] + (h * w * num_anchors,))


def valid_flags(feat_sizes: Sequence[tuple[int, int]], pad_shape: jnp.ndarray,
                strides: Sequence[int] = DEFAULT_STRIDES,
                num_anchors: int = 3) -> jnp.ndarray:
  """mmdetection's ``valid_flags`` for all levels concatenated (spec §3.1).

  Args:
    feat_sizes: static ``[(H_l, W_l)]`` of the bucket's feature maps.
    pad_shape: ``(..., 2)`` int ``(h, w)`` of each image padded to /32.
    strides: level strides.
    num_anchors: anchors per cell.

  Returns:
    ``(..., sum_l H_l * W_l * A)`` bool, level-major, ``(y, x, a)`` order.
  """
  return jnp.concatenate(
      [level_valid_flags(hw, padding.valid_size(pad_shape, s), num_anchors)
       for hw, s in zip(feat_sizes, strides)], axis=-1)
