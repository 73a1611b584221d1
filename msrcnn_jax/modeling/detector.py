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

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax.modeling import losses as losses_lib
from msrcnn_jax.modeling import targets as targets_lib
from msrcnn_jax.modeling.backbone import resnet_from_config
from msrcnn_jax.modeling.fpn import FPN
from msrcnn_jax.modeling.heads.box_postprocess import get_detections
from msrcnn_jax.modeling.roi_heads import MaskScoringRoIHead
from msrcnn_jax.modeling.rpn import RPNHead, get_proposals
from msrcnn_jax.ops import anchors as anchors_lib
from msrcnn_jax.ops.roi_align import multilevel_roi_align


class MaskScoringRCNN(nn.Module):
  """Mask Scoring R-CNN with a ResNet/ResNeXt-FPN backbone.

  Attributes:
    config: the full config (``model``, ``test`` and ``train`` are read).
    dtype: compute dtype of the convolutions and dense layers (parameters
      stay float32; box decoding, NMS and losses always run in float32).
    backbone_fn: ``(config.model.backbone, dtype) -> module`` giving
      C2..C5 (``backbone.resnet_from_config``).
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  backbone_fn: Callable[..., nn.Module] = resnet_from_config

  def setup(self):
    m = self.config.model
    self.backbone = self.backbone_fn(m.backbone, self.dtype)
    self.neck = FPN(in_channels=tuple(m.neck.in_channels),
                    out_channels=m.neck.out_channels,
                    num_outs=m.neck.num_outs, dtype=self.dtype)
    self.rpn_head = RPNHead(
        feat_channels=m.rpn_head.feat_channels,
        num_anchors=len(m.rpn_head.anchor_ratios) * len(
            m.rpn_head.anchor_scales), dtype=self.dtype)
    self.roi_head = MaskScoringRoIHead(m.roi_head, m.num_classes,
                                       dtype=self.dtype)

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
    cls, reg = self.rpn(feats)
    return self._proposals_from_maps(cls, reg, img_shape, pad_shape, train)

  def _proposals_from_maps(self, cls, reg, img_shape, pad_shape, train):
    m = self.config.model
    cfg = self.config.train.rpn_proposal if train else self.config.test.rpn
    # Box decoding and NMS always run in float32 (bf16 cannot hold pixel
    # coordinates of a 1333-pixel image).
    cls = [c.astype(jnp.float32) for c in cls]
    reg = [r.astype(jnp.float32) for r in reg]
    return get_proposals(
        cls, reg, img_shape=img_shape, pad_shape=pad_shape,
        strides=tuple(m.rpn_head.anchor_strides),
        scales=tuple(m.rpn_head.anchor_scales),
        ratios=tuple(m.rpn_head.anchor_ratios),
        nms_pre=cfg.nms_pre, max_per_img=cfg.max_per_img,
        iou_threshold=cfg.iou_threshold,
        target_stds=tuple(m.rpn_head.target_stds))

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
    cls_logits = cls_logits.astype(jnp.float32)
    deltas = deltas.astype(jnp.float32)
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
    mask_logits = losses_lib.select_class(self.roi_head.mask(mask_feats), labels)
    mask_iou_all = self.roi_head.mask_iou(mask_feats, mask_logits)
    mask_logits = mask_logits.astype(jnp.float32)
    mask_iou_all = mask_iou_all.astype(jnp.float32)
    mask_iou = losses_lib.select_class(mask_iou_all, labels)
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
        # mmdetection pastes with (boxes * scale) / scale, not the boxes
        # themselves (spec §2.5 step 7); the float32 rounding can move a
        # pixel of a small mask.
        paste_boxes=(mask_rois / scale_factor[:, None, :]) * vf[..., None],
    )
    if return_intermediates:
      out.update(proposals=rois, proposal_scores=roi_scores,
                 proposal_valid=roi_valid, bbox_cls_logits=cls_logits,
                 bbox_deltas=deltas, mask_rois=mask_rois,
                 features=feats)
    return out

  # ------------------------------------------------------------- training
  def losses(self, batch: dict[str, jnp.ndarray], rng: jax.Array,
             sampled: dict[str, Any] | None = None
             ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Training losses of a batch (spec §3), all on device, static shapes.

    Args:
      batch: ``image (B, H, W, 3)``, ``img_shape``/``pad_shape (B, 2)``,
        ``gt_boxes (B, G, 4)`` train-scale, ``gt_labels (B, G)``,
        ``gt_valid (B, G)`` (rows with zero width or height count as
        padding), ``gt_masks (B, G, M, M)`` box-aligned crops;
        optional ``gt_mask_frames (B, G, 4)``: the box each crop covers
        (default ``gt_boxes``; the whole padded image for full bitmaps).
      rng: PRNG key of the RPN and R-CNN samplers.
      sampled: optional fixed samples instead of random draws (parity
        tests): ``rpn``/``rcnn`` = ``(indices, is_pos, valid)`` batched as
        ``targets.rpn_targets``/``rcnn_targets`` take them, and optionally
        ``proposals``/``proposal_valid`` to replace the RPN's proposals.

    Returns:
      ``(total_loss, metrics)``; metrics hold every loss term and
      ``rcnn_acc``, ``num_rpn_pos``, ``num_rcnn_pos``.
    """
    m, t = self.config.model, self.config.train
    rh = m.roi_head
    num_classes = m.num_classes
    img_shape, pad_shape = batch['img_shape'], batch['pad_shape']
    gt_boxes = batch['gt_boxes'].astype(jnp.float32)
    gt_labels = batch['gt_labels'].astype(jnp.int32)
    # A zero-width or zero-height box cannot be regressed to (log 0 in the
    # box targets): such a row counts as padding, as the COCO loader already
    # drops ``w < 1 or h < 1`` annotations (mmdetection _parse_ann_info).
    gt_valid = (batch['gt_valid'].astype(bool)
                & (gt_boxes[..., 2] > gt_boxes[..., 0])
                & (gt_boxes[..., 3] > gt_boxes[..., 1]))
    gt_masks = batch['gt_masks']
    frames = batch.get('gt_mask_frames', gt_boxes)
    bsz = gt_boxes.shape[0]
    rng_rpn, rng_rcnn = jax.random.split(rng)
    sampled = sampled or {}

    feats = self.features(batch['image'], pad_shape)
    cls, reg = self.rpn(feats)

    # RPN: anchor targets and loss (spec §3.1).
    strides = tuple(m.rpn_head.anchor_strides)
    feat_sizes = [tuple(c.shape[1:3]) for c in cls]
    anchors = jnp.concatenate(anchors_lib.multilevel_anchors(
        feat_sizes, strides, tuple(m.rpn_head.anchor_scales),
        tuple(m.rpn_head.anchor_ratios)))
    num_anchors = cls[0].shape[-1]
    vflags = anchors_lib.valid_flags(feat_sizes, pad_shape, strides,
                                     num_anchors)
    rpn_cfg = t.rpn

    def rpn_one(vf, gb, gv, key, smp):
      return targets_lib.rpn_targets(
          anchors, vf, gb, gv, rng=key, sampled=smp,
          pos_iou_thr=rpn_cfg.pos_iou_thr, neg_iou_thr=rpn_cfg.neg_iou_thr,
          min_pos_iou=rpn_cfg.min_pos_iou,
          num_samples=rpn_cfg.num_samples,
          pos_fraction=rpn_cfg.pos_fraction,
          target_stds=tuple(m.rpn_head.target_stds))
    rpn_t = jax.vmap(rpn_one)(vflags, gt_boxes, gt_valid,
                              jax.random.split(rng_rpn, bsz),
                              sampled.get('rpn'))
    rpn_l = losses_lib.rpn_loss(cls, reg, rpn_t['labels'],
                                rpn_t['label_weights'],
                                rpn_t['bbox_targets'], rpn_t['bbox_weights'])

    # Proposals (detached) and R-CNN sampling (spec §3.2).
    if 'proposals' in sampled:
      props = sampled['proposals']
      prop_valid = sampled['proposal_valid']
    else:
      props, _, prop_valid = self._proposals_from_maps(
          cls, reg, img_shape, pad_shape, train=True)
    rc_cfg = t.rcnn

    def rcnn_one(p, pv, gb, gl, gv, key, smp):
      return targets_lib.rcnn_targets(
          p, pv, gb, gl, gv, rng=key, sampled=smp,
          pos_iou_thr=rc_cfg.pos_iou_thr, neg_iou_thr=rc_cfg.neg_iou_thr,
          min_pos_iou=rc_cfg.min_pos_iou, num_samples=rc_cfg.num_samples,
          pos_fraction=rc_cfg.pos_fraction, num_classes=num_classes,
          target_stds=tuple(rh.bbox_head.target_stds))
    rc = jax.vmap(rcnn_one)(props, prop_valid, gt_boxes, gt_labels, gt_valid,
                            jax.random.split(rng_rcnn, bsz),
                            sampled.get('rcnn'))
    bbox_feats = self.roi_features(feats, rc['rois'], pad_shape,
                                   rh.bbox_roi_extractor.output_size)
    cls_logits, deltas = self.roi_head.box(bbox_feats)
    rcnn_l = losses_lib.rcnn_loss(cls_logits, deltas, rc['labels'],
                                  rc['label_weights'], rc['bbox_targets'],
                                  rc['bbox_weights'], num_classes)

    # Mask and MaskIoU heads on the positives, which always sit in the first
    # num_samples * pos_fraction slots (spec §3.3, §3.4).
    npos = int(rc_cfg.num_samples * rc_cfg.pos_fraction)
    pos_rois = rc['rois'][:, :npos]
    pos_valid = rc['is_pos'][:, :npos]
    pos_gt = rc['pos_assigned_gt'][:, :npos]
    pos_labels = jnp.where(pos_valid, rc['labels'][:, :npos], 0)
    mask_feats = self.roi_features(feats, pos_rois, pad_shape,
                                   rh.mask_roi_extractor.output_size)
    mask_logits = losses_lib.select_class(self.roi_head.mask(mask_feats), pos_labels)
    mask_t = jax.vmap(
        lambda r, g, gm, fr, ps, v: targets_lib.mask_targets(
            r, g, gm, fr, ps, mask_size=rc_cfg.mask_size, valid=v))(
                pos_rois, pos_gt, gt_masks, frames, pad_shape, pos_valid)
    loss_mask = losses_lib.mask_loss(mask_logits, mask_t, pos_valid)
    iou_pred = losses_lib.select_class(self.roi_head.mask_iou(mask_feats, mask_logits),
                          pos_labels)
    iou_t = jax.vmap(
        lambda r, g, ml, mt, gm, fr, ps, v: targets_lib.maskiou_targets(
            r, g, ml, mt, gm, fr, ps, valid=v,
            mask_thr_binary=rc_cfg.mask_thr_binary))(
                pos_rois, pos_gt, jax.lax.stop_gradient(
                    mask_logits.astype(jnp.float32)), mask_t, gt_masks,
                frames, pad_shape, pos_valid)
    lw = t.loss_weights
    loss_mask_iou = losses_lib.maskiou_loss(iou_pred, iou_t, pos_valid,
                                            loss_weight=lw.mask_iou)
    metrics = dict(
        loss_rpn_cls=lw.rpn_cls * rpn_l['loss_rpn_cls'],
        loss_rpn_bbox=lw.rpn_bbox * rpn_l['loss_rpn_bbox'],
        loss_cls=lw.cls * rcnn_l['loss_cls'],
        loss_bbox=lw.bbox * rcnn_l['loss_bbox'],
        loss_mask=lw.mask * loss_mask,
        loss_mask_iou=loss_mask_iou)
    total = sum(metrics.values())
    metrics.update(
        rcnn_acc=rcnn_l['acc'],
        num_rpn_pos=jnp.mean(rpn_t['num_pos'].astype(jnp.float32)),
        num_rcnn_pos=jnp.mean(jnp.sum(pos_valid, -1).astype(jnp.float32)))
    return total, metrics

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
