"""The spine: MaskScoringRCNN = backbone -> FPN -> RPN -> RoI heads.

Inference reproduces mmdetection 2.x ``MaskScoringRCNN.simple_test`` with
``rescale=True`` (spec §2) on a padded, bucketed batch with static shapes:

  images (B, H, W, 3) --backbone/FPN--> P2..P6
  --RPN--> proposals (B, 1000, 4) test scale + validity
  --RoIAlign 7x7 + Shared2FC--> multiclass NMS --> detections (B, 100)
  --RoIAlign 14x14 + FCN mask head + MaskIoU head--> masks, MaskIoU, scores.

Every output has a fixed size; padding rows have ``valid == False``. Outputs
do not depend on how far the batch is padded beyond each image's own /32
``pad_shape`` (the features are zeroed beyond it, as mmdetection's per-image
padding leaves them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax.modeling.backbone import ResNet
from msrcnn_jax.modeling.fpn import FPN
from msrcnn_jax.modeling.heads.box_postprocess import get_detections
from msrcnn_jax.modeling.roi_heads import MaskScoringRoIHead
from msrcnn_jax.modeling.rpn import RPNHead, get_proposals
from msrcnn_jax.ops.roi_align import multilevel_roi_align


def take_class(x: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Selects class ``labels[...]`` from the last axis of ``x``.

  Args:
    x: ``(B, K, ..., num_classes)``.
    labels: ``(B, K)`` int32.

  Returns:
    ``(B, K, ...)``.
  """
  idx = labels.reshape(labels.shape + (1,) * (x.ndim - labels.ndim))
  return jnp.take_along_axis(x, idx, axis=-1)[..., 0]


class MaskScoringRCNN(nn.Module):
  """Mask Scoring R-CNN with a ResNet/ResNeXt-FPN backbone.

  Attributes:
    config: the full config (``model``, ``test`` and ``train`` are read).
  """
  config: ml_collections.ConfigDict

  def setup(self):
    m = self.config.model
    b = m.backbone
    self.backbone = ResNet(
        depth=b.depth, style=b.style, groups=b.groups,
        base_width=b.base_width, base_channels=b.base_channels,
        frozen_stages=b.frozen_stages, bn_eps=b.bn_eps)
    self.neck = FPN(in_channels=tuple(m.neck.in_channels),
                    out_channels=m.neck.out_channels,
                    num_outs=m.neck.num_outs)
    self.rpn_head = RPNHead(
        feat_channels=m.rpn_head.feat_channels,
        num_anchors=len(m.rpn_head.anchor_ratios) * len(
            m.rpn_head.anchor_scales))
    self.roi_head = MaskScoringRoIHead(m.roi_head)

  # ----------------------------------------------------------- the stages
  def features(self, images: jnp.ndarray, pad_shape: jnp.ndarray):
    """Backbone + FPN.

    Args:
      images: ``(B, H, W, 3)`` float, normalised, zero padded.
      pad_shape: ``(B, 2)`` int32 per-image /32-padded (h, w).

    Returns:
      ``[P2, ..., P6]``, each ``(B, H/s, W/s, C)`` (P6: ``ceil``).
    """
    return self.neck(self.backbone(images, pad_shape), pad_shape)

  def rpn(self, feats):
    """RPN head on ``[P2..P6]`` -> (cls logits list, deltas list)."""
    return self.rpn_head(feats)

  def proposals(self, feats, img_shape, pad_shape, train: bool = False):
    """RPN proposals, ``(boxes (B, N, 4), scores (B, N), valid (B, N))``.

    Boxes are in test (resized image) pixels; ``N = max_per_img``.
    """
    m = self.config.model
    cfg = self.config.train.rpn_proposal if train else self.config.test.rpn
    cls, reg = self.rpn(feats)
    return get_proposals(
        cls, reg, img_shape=img_shape, pad_shape=pad_shape,
        strides=tuple(m.rpn_head.anchor_strides),
        scales=tuple(m.rpn_head.anchor_scales),
        ratios=tuple(m.rpn_head.anchor_ratios),
        nms_pre=cfg.nms_pre, max_per_img=cfg.max_per_img,
        iou_threshold=cfg.iou_threshold)

  def roi_features(self, feats, boxes, pad_shape, output_size: int):
    """RoIAlign of ``boxes (B, N, 4)`` (test scale) from P2..P5."""
    r = self.config.model.roi_head
    return multilevel_roi_align(
        feats[:len(r.featmap_strides)], boxes, pad_shape,
        strides=tuple(r.featmap_strides), output_size=output_size,
        max_samples=r.roi_align_max_samples, finest_scale=r.finest_scale)

  # ------------------------------------------------------------ inference
  def __call__(self, images, img_shape, pad_shape, scale_factor,
               return_intermediates: bool = False) -> dict[str, Any]:
    """Inference (spec §2).

    Args:
      images: ``(B, H, W, 3)`` float32 normalised, zero padded to a bucket.
      img_shape: ``(B, 2)`` int32 resized (h, w) before padding.
      pad_shape: ``(B, 2)`` int32 resized (h, w) padded to /32.
      scale_factor: ``(B, 4)`` float32 (w_scale, h_scale, w_scale, h_scale).
      return_intermediates: also return proposals and head outputs.

    Returns:
      dict with, for ``K = test.rcnn.max_per_img``:
        ``boxes (B, K, 4)`` float32 x1,y1,x2,y2 in ORIGINAL image pixels;
        ``scores (B, K)`` box scores; ``labels (B, K)`` int32 0..79;
        ``valid (B, K)`` bool; ``mask_logits (B, K, 28, 28)`` of the label;
        ``mask_iou (B, K)`` MaskIoU of the label (raw fc output);
        ``mask_iou_all (B, K, 80)``; ``mask_scores (B, K)`` =
        mask_iou * scores. Padding rows are zero.
    """
    rc = self.config.test.rcnn
    r = self.config.model.roi_head
    feats = self.features(images, pad_shape)
    rois, roi_scores, roi_valid = self.proposals(feats, img_shape, pad_shape)
    bbox_feats = self.roi_features(feats, rois, pad_shape,
                                   r.bbox_roi_extractor.output_size)
    cls_logits, deltas = self.roi_head.box(bbox_feats)
    det = get_detections(
        rois, roi_valid, cls_logits, deltas, img_shape=img_shape,
        scale_factor=scale_factor, score_thr=rc.score_thr,
        iou_threshold=rc.iou_threshold, max_per_img=rc.max_per_img,
        max_candidates=rc.max_candidates,
        target_stds=tuple(r.bbox_head.target_stds))
    valid = det['valid']
    labels = jnp.where(valid, det['labels'], 0)
    # Back to test scale for the mask RoIs (spec §2.5 step 1).
    mask_rois = det['boxes'] * scale_factor[:, None, :]
    mask_feats = self.roi_features(feats, mask_rois, pad_shape,
                                   r.mask_roi_extractor.output_size)
    mask_logits = take_class(self.roi_head.mask(mask_feats), labels)
    mask_iou_all = self.roi_head.mask_iou(mask_feats, mask_logits)
    mask_iou = take_class(mask_iou_all, labels)
    vf = valid.astype(mask_iou.dtype)
    out = dict(
        boxes=det['boxes'] * vf[..., None],
        scores=det['scores'] * vf,
        labels=labels,
        valid=valid,
        mask_logits=mask_logits * vf[..., None, None],
        mask_iou=mask_iou * vf,
        mask_iou_all=mask_iou_all * vf[..., None],
        mask_scores=mask_iou * det['scores'] * vf,
    )
    if return_intermediates:
      out.update(proposals=rois, proposal_scores=roi_scores,
                 proposal_valid=roi_valid, bbox_cls_logits=cls_logits,
                 bbox_deltas=deltas, mask_rois=mask_rois,
                 features=feats)
    return out

  def init_all(self, images, pad_shape):
    """Touches every submodule once so ``init`` creates every parameter."""
    feats = self.features(images, pad_shape)
    self.rpn(feats)
    c = feats[0].shape[-1]
    bbox = jnp.zeros((1, 7, 7, c), images.dtype)
    mask = jnp.zeros((1, 14, 14, c), images.dtype)
    return self.roi_head(bbox, mask)


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array,
                   image_hw=(64, 64)) -> dict:
  """Randomly initialised ``{'params', 'batch_stats'}`` for ``config``."""
  model = MaskScoringRCNN(config)
  images = jnp.zeros((1,) + tuple(image_hw) + (3,), jnp.float32)
  pad = jnp.asarray([image_hw], jnp.int32)
  return model.init(rng, images, pad, method=MaskScoringRCNN.init_all)
