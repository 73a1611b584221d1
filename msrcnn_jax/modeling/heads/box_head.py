"""Shared2FCBBoxHead: two shared FCs, then class logits and deltas (spec §1.6),
with its training targets (``bbox_targets``) and loss (``rcnn_loss``).

Params: ``shared_fcs_0``, ``shared_fcs_1``, ``fc_cls`` (81: the 80 classes in
sorted COCO id order, then background at index 80), ``fc_reg`` (320, row
``4 * c + k`` with k = dx, dy, dw, dh; class-specific).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrcnn_jax.modeling import layers
from msrcnn_jax.ops.boxes import encode_deltas
from msrcnn_jax.ops.losses import AVG_FACTOR_EPS


def flatten_nchw(x: jnp.ndarray) -> jnp.ndarray:
  """``(..., h, w, C) -> (..., C * h * w)`` in PyTorch's (c, y, x) order.

  So the FC kernel is the transposed torch weight (spec §5.6).
  """
  lead = x.shape[:-3]
  x = jnp.moveaxis(x, -1, -3)
  return x.reshape(lead + (-1,))


class Shared2FCBBoxHead(nn.Module):
  """Box classification and regression head of MS R-CNN.

  Attributes:
    fc_out_channels: width of the shared FCs (1024 released).
    num_classes: foreground classes (80).
    dtype: computation dtype.
  """
  fc_out_channels: int = 1024
  num_classes: int = 80
  dtype: Any = jnp.float32

  def setup(self):
    self.shared_fcs = [
        nn.Dense(self.fc_out_channels, kernel_init=layers.XAVIER_UNIFORM,
                 dtype=self.dtype, param_dtype=jnp.float32)
        for _ in range(2)]
    self.fc_cls = nn.Dense(self.num_classes + 1,
                           kernel_init=nn.initializers.normal(0.01),
                           dtype=self.dtype, param_dtype=jnp.float32)
    self.fc_reg = nn.Dense(4 * self.num_classes,
                           kernel_init=nn.initializers.normal(0.001),
                           dtype=self.dtype, param_dtype=jnp.float32)

  def __call__(self,
               roi_feats: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Scores and deltas of RoIs.

    Args:
      roi_feats: ``(..., 7, 7, C)`` RoIAlign features.

    Returns:
      ``cls_logits (..., num_classes + 1)`` (softmax logits, background
      last) and ``deltas (..., 4 * num_classes)`` (normalised by the coder's
      stds 0.1, 0.1, 0.2, 0.2), float32.
    """
    x = flatten_nchw(roi_feats)
    for fc in self.shared_fcs:
      x = nn.relu(fc(x))
    return (self.fc_cls(x).astype(jnp.float32),
            self.fc_reg(x).astype(jnp.float32))


def bbox_targets(rois: jnp.ndarray,
                 is_pos: jnp.ndarray,
                 roi_valid: jnp.ndarray,
                 matched_gt_boxes: jnp.ndarray,
                 matched_gt_labels: jnp.ndarray,
                 num_classes: int = 80,
                 target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2)
                 ) -> dict:
  """Box-head targets of sampled RoIs (spec §3.2, ``BBoxHead.get_targets``).

  Args:
    rois: ``(S, 4)`` float32 sampled RoIs, train scale.
    is_pos: ``(S,)`` bool positives; roi_valid: ``(S,)`` bool sampled slots.
    matched_gt_boxes: ``(S, 4)`` the GT box of each positive (anything
      elsewhere).
    matched_gt_labels: ``(S,)`` int its label in ``0..num_classes-1``.
    num_classes: background label = ``num_classes``.
    target_stds: box-coder stds.

  Returns:
    dict ``labels (S,)`` int32 (GT label on positives, ``num_classes``
    elsewhere), ``label_weights (S,)`` float32 1 on valid slots,
    ``bbox_targets (S, 4)`` encoded deltas (0 off positives),
    ``bbox_weights (S, 4)`` 1 on positives.
  """
  labels = jnp.where(is_pos, matched_gt_labels.astype(jnp.int32),
                     num_classes)
  deltas = encode_deltas(jnp.where(is_pos[:, None], rois, 1.0),
                         jnp.where(is_pos[:, None], matched_gt_boxes, 1.0),
                         stds=target_stds)
  posf = is_pos.astype(jnp.float32)
  return dict(
      labels=labels,
      label_weights=roi_valid.astype(jnp.float32),
      bbox_targets=jnp.where(is_pos[:, None], deltas, 0.0),
      bbox_weights=jnp.broadcast_to(posf[:, None], (rois.shape[0], 4)))


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
  (``bbox_targets.size(0)``: all sampled RoIs, not the positives). Leading
  batch axes are flattened: a batch is normalised as mmdetection normalises
  the concatenation of its images.

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
  loss_cls = jnp.sum(ce * w) / (num + AVG_FACTOR_EPS)
  pos = (y >= 0) & (y < num_classes) & (w > 0)
  cls_idx = jnp.clip(y, 0, num_classes - 1)
  d_gt = jnp.take_along_axis(d, cls_idx[:, None, None], axis=1)[:, 0]
  l1 = jnp.abs(d_gt - t) * bw * pos[:, None]
  loss_bbox = jnp.sum(l1) / (num + AVG_FACTOR_EPS)
  correct = (jnp.argmax(c, axis=-1) == y) & (w > 0)
  acc = 100.0 * jnp.sum(correct) / num
  return dict(loss_cls=loss_cls, loss_bbox=loss_bbox, acc=acc)
