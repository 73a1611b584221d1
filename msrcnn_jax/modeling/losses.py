"""Training losses of Mask Scoring R-CNN, normalised as mmdetection (spec §3).

All functions take fixed-size arrays with weights / validity masks; padded
entries contribute nothing. Leading batch axes are flattened, so a batch is
normalised as mmdetection normalises the concatenation of its images.

mmdetection's ``weight_reduce_loss`` divides by ``avg_factor + eps`` with
``eps = finfo(float32).eps`` (v2.25+); that is reproduced.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_EPS = float(jnp.finfo(jnp.float32).eps)


def _bce_with_logits(logits, targets):
  """Elementwise ``binary_cross_entropy_with_logits`` (stable form)."""
  return (jnp.maximum(logits, 0) - logits * targets
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def rpn_loss(cls_logits: Sequence[jnp.ndarray],
             reg_deltas: Sequence[jnp.ndarray],
             labels: jnp.ndarray,
             label_weights: jnp.ndarray,
             bbox_targets: jnp.ndarray,
             bbox_weights: jnp.ndarray) -> dict:
  """RPN loss (spec §3.1, ``AnchorHead.loss``): BCE-with-logits + L1.

  Both terms of every level are summed over the batch and divided by
  ``avg_factor = sum_b max(#pos_b, 1) + max(#neg_b, 1)`` (sampled anchors).

  Args:
    cls_logits: per level ``(B, H_l, W_l, A)`` logits (NHWC; flattening gives
      mmdetection's (y, x, a) anchor order).
    reg_deltas: per level ``(B, H_l, W_l, 4 A)``.
    labels: ``(B, N)`` BCE targets (1 positive, 0 otherwise), N = sum of
      ``H_l W_l A``, levels concatenated.
    label_weights: ``(B, N)`` 1 on sampled anchors.
    bbox_targets: ``(B, N, 4)``; bbox_weights: ``(B, N, 4)`` 1 on positives.

  Returns:
    dict: ``loss_rpn_cls``, ``loss_rpn_bbox`` (scalars, sums over levels) and
    ``loss_rpn_cls_levels``, ``loss_rpn_bbox_levels`` ``(L,)``.
  """
  sampled = label_weights > 0
  pos = sampled & (labels > 0)
  num_pos = jnp.maximum(jnp.sum(pos, axis=-1), 1)
  num_neg = jnp.maximum(jnp.sum(sampled & ~pos, axis=-1), 1)
  avg = jnp.sum(num_pos + num_neg).astype(jnp.float32) + _EPS
  cls_levels, box_levels = [], []
  start = 0
  for c, r in zip(cls_logits, reg_deltas):
    b = c.shape[0]
    c = c.reshape(b, -1).astype(jnp.float32)
    r = r.reshape(b, -1, 4).astype(jnp.float32)
    n = c.shape[1]
    sl = slice(start, start + n)
    start += n
    bce = _bce_with_logits(c, labels[:, sl]) * label_weights[:, sl]
    l1 = jnp.abs(r - bbox_targets[:, sl]) * bbox_weights[:, sl]
    cls_levels.append(jnp.sum(bce) / avg)
    box_levels.append(jnp.sum(l1) / avg)
  cls_levels = jnp.stack(cls_levels)
  box_levels = jnp.stack(box_levels)
  return dict(loss_rpn_cls=jnp.sum(cls_levels),
              loss_rpn_bbox=jnp.sum(box_levels),
              loss_rpn_cls_levels=cls_levels,
              loss_rpn_bbox_levels=box_levels)


def rcnn_loss(cls_logits: jnp.ndarray,
              deltas: jnp.ndarray,
              labels: jnp.ndarray,
              label_weights: jnp.ndarray,
              bbox_targets: jnp.ndarray,
              bbox_weights: jnp.ndarray,
              num_classes: int = 80) -> dict:
  """Box-head loss (spec §3.2, ``BBoxHead.loss``).

  ``loss_cls``: softmax CE summed over sampled RoIs / #sampled.
  ``loss_bbox``: L1 on the 4 deltas of the GT class of positives / #sampled
  (``bbox_targets.size(0)``: all sampled RoIs, not the positives).

  Args:
    cls_logits: ``(..., S, num_classes + 1)``.
    deltas: ``(..., S, 4 * num_classes)`` class-specific deltas.
    labels: ``(..., S)`` int32, ``num_classes`` = background.
    label_weights: ``(..., S)`` 1 on valid sampled RoIs, 0 on padding.
    bbox_targets, bbox_weights: ``(..., S, 4)``.

  Returns:
    dict ``loss_cls``, ``loss_bbox`` and ``acc`` (percent, logged only).
  """
  c = cls_logits.reshape(-1, cls_logits.shape[-1]).astype(jnp.float32)
  d = deltas.reshape(-1, num_classes, 4).astype(jnp.float32)
  y = labels.reshape(-1).astype(jnp.int32)
  w = label_weights.reshape(-1).astype(jnp.float32)
  t = bbox_targets.reshape(-1, 4)
  bw = bbox_weights.reshape(-1, 4)
  num = jnp.maximum(jnp.sum(w > 0), 1).astype(jnp.float32)
  logp = jax.nn.log_softmax(c, axis=-1)
  ce = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
  loss_cls = jnp.sum(ce * w) / (num + _EPS)
  pos = (y >= 0) & (y < num_classes) & (w > 0)
  cls_idx = jnp.clip(y, 0, num_classes - 1)
  d_gt = jnp.take_along_axis(d, cls_idx[:, None, None], axis=1)[:, 0]
  l1 = jnp.abs(d_gt - t) * bw * pos[:, None]
  loss_bbox = jnp.sum(l1) / (num + _EPS)
  correct = (jnp.argmax(c, axis=-1) == y) & (w > 0)
  acc = 100.0 * jnp.sum(correct) / num
  return dict(loss_cls=loss_cls, loss_bbox=loss_bbox, acc=acc)


def select_class(x: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Channel ``labels[...]`` of the last axis of ``x``.

  Args:
    x: ``(*L, ..., C)``, e.g. mask logits ``(B, P, 28, 28, C)`` (NHWC) or
      MaskIoU output ``(B, P, C)``.
    labels: ``(*L)`` int (leading axes of ``x``), clipped to ``[0, C)``.

  Returns:
    ``x[l..., ..., labels[l...]]``, shape ``(*L, ...)``.
  """
  idx = jnp.clip(labels, 0, x.shape[-1] - 1).astype(jnp.int32)
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - labels.ndim))
  return jnp.take_along_axis(x, idx, axis=-1)[..., 0]


def mask_loss(mask_logits: jnp.ndarray,
              mask_targets: jnp.ndarray,
              valid: jnp.ndarray) -> jnp.ndarray:
  """Mask BCE (spec §3.3): mean over valid positive RoIs x pixels.

  Args:
    mask_logits: ``(..., P, 28, 28)`` logits of each RoI's GT class
      (``select_class``).
    mask_targets: ``(..., P, 28, 28)`` in {0, 1}.
    valid: ``(..., P)`` bool, the positive RoIs.

  Returns:
    scalar; 0 when there is no positive.
  """
  hw = mask_logits.shape[-2] * mask_logits.shape[-1]
  bce = _bce_with_logits(mask_logits.astype(jnp.float32),
                         mask_targets.astype(jnp.float32))
  per_roi = jnp.sum(bce, axis=(-2, -1)) * valid
  num = jnp.sum(valid).astype(jnp.float32) * hw
  return jnp.sum(per_roi) / jnp.maximum(num, 1.0)


def maskiou_loss(iou_pred: jnp.ndarray,
                 iou_targets: jnp.ndarray,
                 valid: jnp.ndarray,
                 loss_weight: float = 0.5) -> jnp.ndarray:
  """MaskIoU MSE (spec §3.4): mean over RoIs with target > 0, x loss_weight.

  Args:
    iou_pred: ``(..., P)`` MaskIoU head output of each RoI's GT class.
    iou_targets: ``(..., P)`` from ``targets.maskiou_targets``.
    valid: ``(..., P)`` bool, the positive RoIs.
    loss_weight: 0.5.

  Returns:
    scalar; 0 when no RoI has a positive target.
  """
  sel = valid & (iou_targets > 0)
  se = jnp.square(iou_pred.astype(jnp.float32) - iou_targets) * sel
  num = jnp.sum(sel).astype(jnp.float32)
  return loss_weight * jnp.sum(se) / jnp.maximum(num, 1.0)
