"""MaskScoringRoIHead: the three RoI heads under one parameter scope.

``params['roi_head']`` holds ``bbox_head``, ``mask_head`` and
``mask_iou_head``, as mmdetection's ``roi_head.*`` keys. The parameter-free
steps between them (RoIAlign, NMS) live in ``msrcnn_jax.ops`` and are wired
together by ``modeling/detector.py``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from msrcnn_jax.modeling.heads.box_head import Shared2FCBBoxHead
from msrcnn_jax.modeling.heads.mask_head import FCNMaskHead
from msrcnn_jax.modeling.heads.maskiou_head import MaskIoUHead


class MaskScoringRoIHead(nn.Module):
  """Box, mask and MaskIoU heads (spec §1.6).

  Attributes:
    config: ``config.model.roi_head``.
    num_classes: ``config.model.num_classes``, read by all three heads.
    dtype: compute dtype of the heads.
  """
  config: ml_collections.ConfigDict
  num_classes: int = 80
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.bbox_head = Shared2FCBBoxHead(
        fc_out_channels=c.bbox_head.fc_out_channels,
        num_classes=self.num_classes, dtype=self.dtype)
    self.mask_head = FCNMaskHead(
        num_convs=c.mask_head.num_convs,
        conv_out_channels=c.mask_head.conv_out_channels,
        num_classes=self.num_classes, dtype=self.dtype)
    self.mask_iou_head = MaskIoUHead(
        num_convs=c.mask_iou_head.num_convs,
        num_fcs=c.mask_iou_head.num_fcs,
        conv_out_channels=c.mask_iou_head.conv_out_channels,
        fc_out_channels=c.mask_iou_head.fc_out_channels,
        num_classes=self.num_classes, dtype=self.dtype)

  def __call__(self, bbox_feats: jnp.ndarray, mask_feats: jnp.ndarray):
    """Runs all heads once (used by ``init``).

    Args:
      bbox_feats: ``(..., 7, 7, C)`` RoI features.
      mask_feats: ``(..., 14, 14, C)`` RoI features.
    """
    cls_logits, deltas = self.bbox_head(bbox_feats)
    mask_logits = self.mask_head(mask_feats)
    mask_iou = self.mask_iou_head(mask_feats, mask_logits[..., 0])
    return cls_logits, deltas, mask_logits, mask_iou

  def box(self, roi_feats):
    """``(..., 7, 7, C)`` -> (cls logits ``(..., 81)``, deltas ``(..., 320)``)."""
    return self.bbox_head(roi_feats)

  def mask(self, roi_feats):
    """``(..., 14, 14, C)`` -> mask logits ``(..., 28, 28, num_classes)``."""
    return self.mask_head(roi_feats)

  def mask_iou(self, roi_feats, class_mask_logits):
    """MaskIoU of every class from the features and one class's logits.

    Args:
      roi_feats: ``(..., 14, 14, C)`` mask RoI features.
      class_mask_logits: ``(..., 28, 28)`` logits of one class per RoI (the
        predicted class at test time, the GT class in training).

    Returns:
      ``(..., num_classes)`` raw MaskIoU predictions (no activation).
    """
    return self.mask_iou_head(roi_feats, class_mask_logits)
