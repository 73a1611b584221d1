"""Box arithmetic in mmdetection v2's convention (spec §0, §2.2, §5.1).

Boxes are ``(x1, y1, x2, y2)`` float32 pixel coordinates, width ``x2 - x1``
with no "+1". Every function is jit-safe and broadcasts over leading axes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# |log(16 / 1000)|: the dw/dh clamp of DeltaXYWHBBoxCoder (wh_ratio_clip).
WH_RATIO_CLIP = 16 / 1000
MAX_LOG_RATIO = abs(math.log(WH_RATIO_CLIP))


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Areas of ``(..., 4)`` boxes, ``(x2 - x1) * (y2 - y1)``, shape ``(...)``."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray,
            eps: float = 1e-6) -> jnp.ndarray:
  """Pairwise IoU as mmdetection's ``bbox_overlaps(mode='iou')``.

  Args:
    boxes1: ``(..., N, 4)`` float boxes.
    boxes2: ``(..., M, 4)`` float boxes.
    eps: lower bound of the union (mmdetection's default 1e-6).

  Returns:
    ``(..., N, M)`` IoU; degenerate boxes give 0.
  """
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  overlap = wh[..., 0] * wh[..., 1]
  union = jnp.maximum(area1[..., :, None] + area2[..., None, :] - overlap, eps)
  return overlap / union


def encode_deltas(boxes: jnp.ndarray, gt: jnp.ndarray,
                  means: Sequence[float] = (0., 0., 0., 0.),
                  stds: Sequence[float] = (1., 1., 1., 1.)) -> jnp.ndarray:
  """DeltaXYWHBBoxCoder.encode: regression targets from ``boxes`` to ``gt``.

  Args:
    boxes: ``(..., 4)`` anchors or proposals.
    gt: ``(..., 4)`` matched ground-truth boxes.
    means, stds: per-delta normalisation (dx, dy, dw, dh).

  Returns:
    ``(..., 4)`` deltas ``((gx-px)/pw, (gy-py)/ph, log(gw/pw), log(gh/ph))``,
    normalised. Degenerate inputs give inf/nan; mask them with weights.
  """
  px = (boxes[..., 0] + boxes[..., 2]) * 0.5
  py = (boxes[..., 1] + boxes[..., 3]) * 0.5
  pw = boxes[..., 2] - boxes[..., 0]
  ph = boxes[..., 3] - boxes[..., 1]
  gx = (gt[..., 0] + gt[..., 2]) * 0.5
  gy = (gt[..., 1] + gt[..., 3]) * 0.5
  gw = gt[..., 2] - gt[..., 0]
  gh = gt[..., 3] - gt[..., 1]
  deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph,
                      jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1)
  return (deltas - jnp.asarray(means, deltas.dtype)) / jnp.asarray(
      stds, deltas.dtype)


def decode_deltas(boxes: jnp.ndarray, deltas: jnp.ndarray,
                  means: Sequence[float] = (0., 0., 0., 0.),
                  stds: Sequence[float] = (1., 1., 1., 1.),
                  max_shape: jnp.ndarray | None = None) -> jnp.ndarray:
  """DeltaXYWHBBoxCoder.decode (``delta2bbox``, spec §2.2 step 5).

  Only dw and dh are clamped to ``[-MAX_LOG_RATIO, MAX_LOG_RATIO]``.

  Args:
    boxes: ``(..., 4)`` anchors or proposals.
    deltas: ``(..., 4)`` normalised deltas (dx, dy, dw, dh).
    means, stds: normalisation used at encoding.
    max_shape: optional ``(..., 2)`` (or ``(2,)``) ``(height, width)`` of the
      unpadded image, broadcastable to ``boxes[..., 0]``; x is clipped to
      ``[0, width]`` and y to ``[0, height]`` (limit W, not W-1).

  Returns:
    ``(..., 4)`` decoded boxes.
  """
  d = deltas * jnp.asarray(stds, deltas.dtype) + jnp.asarray(means,
                                                             deltas.dtype)
  dx, dy = d[..., 0], d[..., 1]
  dw = jnp.clip(d[..., 2], -MAX_LOG_RATIO, MAX_LOG_RATIO)
  dh = jnp.clip(d[..., 3], -MAX_LOG_RATIO, MAX_LOG_RATIO)
  px = (boxes[..., 0] + boxes[..., 2]) * 0.5
  py = (boxes[..., 1] + boxes[..., 3]) * 0.5
  pw = boxes[..., 2] - boxes[..., 0]
  ph = boxes[..., 3] - boxes[..., 1]
  gw = pw * jnp.exp(dw)
  gh = ph * jnp.exp(dh)
  gx = px + pw * dx
  gy = py + ph * dy
  out = jnp.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5],
                  axis=-1)
  if max_shape is not None:
    out = clip_boxes(out, max_shape)
  return out


def clip_boxes(boxes: jnp.ndarray, max_shape: jnp.ndarray) -> jnp.ndarray:
  """Clips ``(..., 4)`` boxes to ``[0, W] x [0, H]``.

  Args:
    boxes: ``(..., 4)`` boxes.
    max_shape: ``(height, width)`` as ``(..., 2)`` broadcastable to
      ``boxes[..., 0]``, or ``(2,)``.
  """
  max_shape = jnp.asarray(max_shape, boxes.dtype)
  h = max_shape[..., 0]
  w = max_shape[..., 1]
  if max_shape.ndim > 1:
    h = h[..., None]
    w = w[..., None]
  x1 = jnp.clip(boxes[..., 0], 0, w)
  y1 = jnp.clip(boxes[..., 1], 0, h)
  x2 = jnp.clip(boxes[..., 2], 0, w)
  y2 = jnp.clip(boxes[..., 3], 0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)
