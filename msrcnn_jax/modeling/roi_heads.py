"""The RoI stage of Mask Scoring R-CNN (mmdetection's ``MaskScoringRoIHead``)
and of Mask R-CNN (``StandardRoIHead``: ``config.model.roi_head.type``).

``MaskScoringRoIHead`` takes the FPN levels and the RPN's proposals and does
everything after them (spec §2.3-§2.5, §3.2-§3.4):

- at test time: RoIAlign 7x7 -> box head -> per-class decode + multiclass
  NMS (``heads/box_postprocess.py``) -> RoIAlign 14x14 of the detections ->
  mask head -> MaskIoU head -> mask scores;
- in training: assign the proposals (plus the GT boxes) to the ground truth
  and sample a fixed number of RoIs (``rcnn_targets``), then the box, mask
  and MaskIoU heads on them with the targets and losses each head file
  defines beside its module.

``params['roi_head']`` holds ``bbox_head``, ``mask_head`` and
``mask_iou_head``, as mmdetection's ``roi_head.*`` keys. With
``type='StandardRoIHead'`` there is no ``mask_iou_head`` (no parameters, no
``loss_mask_iou``) and the outputs carry ``mask_iou`` = 1 and
``mask_scores`` = box scores: mmdetection's StandardRoIHead scores each
mask by its detection's box score. Every array has a
static shape; padding rows carry ``valid == False``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax.modeling.heads import box_head as box_head_lib
from msrcnn_jax.modeling.heads import mask_head as mask_head_lib
from msrcnn_jax.modeling.heads import maskiou_head as maskiou_head_lib
from msrcnn_jax.modeling.heads.box_postprocess import get_detections
from msrcnn_jax.ops import matching
from msrcnn_jax.ops.boxes import box_iou
from msrcnn_jax.ops.roi_align import multilevel_roi_align


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


def rcnn_targets(proposals: jnp.ndarray,
                 proposal_valid: jnp.ndarray,
                 gt_boxes: jnp.ndarray,
                 gt_labels: jnp.ndarray,
                 gt_valid: jnp.ndarray,
                 rng: jax.Array | None = None,
                 sampled=None,
                 pos_iou_thr: float = 0.5,
                 neg_iou_thr: float = 0.5,
                 min_pos_iou: float = 0.5,
                 num_samples: int = 512,
                 pos_fraction: float = 0.25,
                 num_classes: int = 80,
                 target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2)
                 ) -> dict:
  """Sampled RoIs of one image and their box-head targets (spec §3.2).

  The proposals are assigned alone (low-quality matching among proposals
  only, as mmdetection); then the GT boxes are prepended as extra proposals
  with ``gt_inds`` 1..G and IoU 1 (``add_gt_as_proposals``), and
  ``num_samples`` RoIs are drawn from the ``G + N`` candidates; the box
  targets are ``box_head.bbox_targets``.

  Args:
    proposals: ``(N, 4)`` train-scale proposals (e.g. N = 1000), detached.
    proposal_valid: ``(N,)`` bool; padded proposals are never sampled.
    gt_boxes: ``(G, 4)`` float32 train-scale GT boxes, ``gt_labels`` ``(G,)``
      int32 in ``0..num_classes-1``, ``gt_valid`` ``(G,)`` bool; padded rows
      may hold anything.
    rng: PRNG key for the sampler (ignored when ``sampled`` is given).
    sampled: optional ``(indices, is_pos, valid)``, indices into
      ``[gt_boxes; proposals]`` (mmdetection's ``rcnn.sample.*``).
    pos_iou_thr, neg_iou_thr, min_pos_iou: ``train_cfg.rcnn.assigner``.
    num_samples, pos_fraction: ``train_cfg.rcnn.sampler``.
    num_classes: background label = ``num_classes``.
    target_stds: box-coder stds.

  Returns:
    dict, S = ``num_samples``, slots [positives; negatives; padding] as
    mmdetection's ``SamplingResult.bboxes``; the positives always lie
    within the first ``int(S * pos_fraction)`` slots:
    - ``rois`` ``(S, 4)`` train-scale boxes (padding: 0);
    - ``roi_valid`` ``(S,)`` bool, ``is_pos`` ``(S,)`` bool;
    - ``labels``, ``label_weights``, ``bbox_targets``, ``bbox_weights``
      (``box_head.bbox_targets``);
    - ``pos_assigned_gt`` ``(S,)`` int32 0-based GT index (0 off positives);
    - ``sampled_inds`` ``(S,)`` int32 into ``[gt_boxes; proposals]``;
    - ``assigned_gt`` ``(G + N,)`` int32, ``max_overlaps`` ``(G + N,)``.
  """
  num_gt = gt_boxes.shape[0]
  ious = box_iou(gt_boxes, proposals)
  assigned_p, overlaps_p = matching.max_iou_assign(
      ious, gt_valid, pos_iou_thr, neg_iou_thr, min_pos_iou,
      box_valid=proposal_valid)
  gt_ids = jnp.arange(1, num_gt + 1, dtype=jnp.int32)
  assigned = jnp.concatenate([jnp.where(gt_valid, gt_ids, -1), assigned_p])
  max_overlaps = jnp.concatenate(
      [gt_valid.astype(jnp.float32), overlaps_p])
  boxes = jnp.concatenate([gt_boxes, proposals]).astype(jnp.float32)
  indices, is_pos, valid = matching.sample_or_given(
      rng, sampled, assigned > 0, assigned == 0, num_samples, pos_fraction)
  rois = jnp.where(valid[:, None], boxes[indices], 0.0)
  gt_idx = jnp.where(is_pos, jnp.clip(assigned[indices] - 1, 0), 0)
  targets = box_head_lib.bbox_targets(
      rois, is_pos, valid, gt_boxes[gt_idx], gt_labels[gt_idx],
      num_classes=num_classes, target_stds=target_stds)
  return dict(
      rois=rois,
      roi_valid=valid,
      is_pos=is_pos,
      **targets,
      pos_assigned_gt=gt_idx.astype(jnp.int32),
      sampled_inds=indices,
      assigned_gt=assigned,
      max_overlaps=max_overlaps)


class MaskScoringRoIHead(nn.Module):
  """Box, mask and MaskIoU heads with their sampling, targets and losses.

  Attributes:
    config: ``config.model.roi_head`` (the heads, the RoI extractors'
      ``output_size``, ``featmap_strides``, ``finest_scale``,
      ``roi_align_max_samples``).
    num_classes: ``config.model.num_classes``, read by all three heads.
    train_cfg: ``config.train`` (``rcnn`` assigner/sampler/mask settings,
      ``loss_weights``); needed for training only.
    test_cfg: ``config.test.rcnn`` (``score_thr``, ``iou_threshold``,
      ``max_per_img``, ``max_candidates``); needed for inference only.
    dtype: compute dtype of the heads (box decoding, NMS and the losses
      always run in float32).
  """
  config: ml_collections.ConfigDict
  num_classes: int = 80
  train_cfg: ml_collections.ConfigDict | None = None
  test_cfg: ml_collections.ConfigDict | None = None
  dtype: Any = jnp.float32

  @property
  def with_mask_iou(self) -> bool:
    """``config.type == 'MaskScoringRoIHead'`` (absent: True)."""
    return self.config.get('type', 'MaskScoringRoIHead') == (
        'MaskScoringRoIHead')

  def setup(self):
    c = self.config
    self.bbox_head = box_head_lib.Shared2FCBBoxHead(
        fc_out_channels=c.bbox_head.fc_out_channels,
        num_classes=self.num_classes, dtype=self.dtype)
    self.mask_head = mask_head_lib.FCNMaskHead(
        num_convs=c.mask_head.num_convs,
        conv_out_channels=c.mask_head.conv_out_channels,
        num_classes=self.num_classes, dtype=self.dtype)
    # StandardRoIHead (Mask R-CNN): no MaskIoU head, no parameters for it.
    if self.with_mask_iou:
      self.mask_iou_head = maskiou_head_lib.MaskIoUHead(
          num_convs=c.mask_iou_head.num_convs,
          num_fcs=c.mask_iou_head.num_fcs,
          conv_out_channels=c.mask_iou_head.conv_out_channels,
          fc_out_channels=c.mask_iou_head.fc_out_channels,
          num_classes=self.num_classes, dtype=self.dtype)

  def __call__(self, feats: Sequence[jnp.ndarray], proposals: dict,
               img_shape: jnp.ndarray, pad_shape: jnp.ndarray,
               scale_factor: jnp.ndarray | None = None,
               gt: dict | None = None, rng: jax.Array | None = None,
               sampled: dict | None = None,
               return_intermediates: bool = False) -> tuple[dict, dict]:
    """Detections (inference) or losses (training, when ``gt`` is given).

    Args:
      feats: ``[P2..P6]`` (P2..P5 are pooled), each ``(B, H_l, W_l, C)``.
      proposals: the RPN stage's ``boxes (B, N, 4)`` and ``valid (B, N)``.
      img_shape: ``(B, 2)`` int32 resized (h, w) before padding.
      pad_shape: ``(B, 2)`` int32 (h, w) padded to /32.
      scale_factor: inference only: ``(B, 4)`` float32 (w, h, w, h) scales.
      gt: training only: ``boxes (B, G, 4)`` float32 train scale, ``labels
        (B, G)`` int32, ``valid (B, G)`` bool, ``masks (B, G, M, M)`` crops
        and ``mask_frames (B, G, 4)`` (``ops.masks`` docstring).
      rng: training only: PRNG key of the RoI sampler.
      sampled: training only, optional (parity tests): ``rcnn`` = the
        sampler's ``(indices, is_pos, valid)`` batched, instead of drawing.
      return_intermediates: inference only: also return the box head's
        outputs and the mask RoIs.

    Returns:
      ``(detections, losses)``: at test time ``(simple_test(...), {})``, in
      training ``({}, forward_train(...))``.
    """
    if gt is None:
      return self.simple_test(feats, proposals, img_shape, pad_shape,
                              scale_factor, return_intermediates), {}
    return {}, self.forward_train(feats, proposals, pad_shape, gt, rng,
                                  sampled)

  def init_heads(self, bbox_feats: jnp.ndarray, mask_feats: jnp.ndarray):
    """Runs every head once on RoI features (creates the parameters).

    Args:
      bbox_feats: ``(..., 7, 7, C)`` RoI features.
      mask_feats: ``(..., 14, 14, C)`` RoI features.
    """
    cls_logits, deltas = self.bbox_head(bbox_feats)
    mask_logits = self.mask_head(mask_feats)
    if not self.with_mask_iou:
      return cls_logits, deltas, mask_logits
    mask_iou = self.mask_iou_head(mask_feats, mask_logits[..., 0])
    return cls_logits, deltas, mask_logits, mask_iou

  def roi_features(self, feats, boxes, pad_shape, output_size: int):
    """RoIAlign of ``boxes (B, N, 4)`` from P2..P5 (``SingleRoIExtractor``)."""
    c = self.config
    return multilevel_roi_align(
        feats[:len(c.featmap_strides)], boxes, pad_shape,
        strides=tuple(c.featmap_strides), output_size=output_size,
        max_samples=c.roi_align_max_samples, finest_scale=c.finest_scale)

  # ------------------------------------------------------------ inference
  def simple_test(self, feats, proposals, img_shape, pad_shape, scale_factor,
                  return_intermediates: bool = False) -> dict:
    """Detections, masks and mask scores (spec §2.3-§2.5, ``rescale=True``).

    Returns:
      dict with, for ``K = test_cfg.max_per_img``:
        ``boxes (B, K, 4)`` float32 x1,y1,x2,y2 in ORIGINAL image pixels;
        ``scores (B, K)`` box scores; ``labels (B, K)`` int32;
        ``valid (B, K)`` bool; ``mask_logits (B, K, 28, 28)`` of the label;
        ``mask_iou (B, K)`` MaskIoU of the label (raw fc output; 1 without
        a MaskIoU head); ``mask_iou_all (B, K, num_classes)`` (ones without
        one); ``mask_scores (B, K)`` = mask_iou * scores (= scores); ``paste_boxes (B, K, 4)``. Padding rows are
        zero. With ``return_intermediates`` also ``bbox_cls_logits``,
        ``bbox_deltas`` (per proposal) and ``mask_rois`` (test scale).
    """
    c, rc = self.config, self.test_cfg
    rois, roi_valid = proposals['boxes'], proposals['valid']
    bbox_feats = self.roi_features(feats, rois, pad_shape,
                                   c.bbox_roi_extractor.output_size)
    cls_logits, deltas = self.bbox_head(bbox_feats)
    cls_logits = cls_logits.astype(jnp.float32)
    deltas = deltas.astype(jnp.float32)
    det = get_detections(
        rois, roi_valid, cls_logits, deltas, img_shape=img_shape,
        scale_factor=scale_factor, score_thr=rc.score_thr,
        iou_threshold=rc.iou_threshold, max_per_img=rc.max_per_img,
        max_candidates=rc.max_candidates,
        target_stds=tuple(c.bbox_head.target_stds))
    valid = det['valid']
    labels = jnp.where(valid, det['labels'], 0)
    # Back to test scale for the mask RoIs (spec §2.5 step 1).
    mask_rois = det['boxes'] * scale_factor[:, None, :]
    mask_feats = self.roi_features(feats, mask_rois, pad_shape,
                                   c.mask_roi_extractor.output_size)
    mask_logits = select_class(self.mask_head(mask_feats), labels)
    if self.with_mask_iou:
      mask_iou_all = self.mask_iou_head(mask_feats, mask_logits)
      mask_iou_all = mask_iou_all.astype(jnp.float32)
    else:
      # StandardRoIHead scores masks by the box score: MaskIoU 1.
      mask_iou_all = jnp.ones(labels.shape + (self.num_classes,),
                              jnp.float32)
    mask_logits = mask_logits.astype(jnp.float32)
    mask_iou = select_class(mask_iou_all, labels)
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
      out.update(bbox_cls_logits=cls_logits, bbox_deltas=deltas,
                 mask_rois=mask_rois)
    return out

  # ------------------------------------------------------------- training
  def forward_train(self, feats, proposals, pad_shape, gt, rng,
                    sampled=None) -> dict:
    """RoI sampling, the three heads and their weighted losses (spec §3.2-4).

    Returns:
      dict ``loss_cls``, ``loss_bbox``, ``loss_mask``, ``loss_mask_iou``
      (not with ``StandardRoIHead``; weighted by
      ``train_cfg.loss_weights``), ``rcnn_acc`` (percent) and
      ``num_rcnn_pos`` (mean positives per image).
    """
    samples = self.sample(proposals, gt, rng, (sampled or {}).get('rcnn'))
    losses = self._box_losses(feats, samples, pad_shape)
    losses.update(self._mask_losses(feats, samples, pad_shape, gt))
    return losses

  def sample(self, proposals, gt, rng, sampled=None) -> dict:
    """``rcnn_targets`` of every image of the batch."""
    rc = self.train_cfg.rcnn
    box_cfg = self.config.bbox_head

    def one(p, pv, gb, gl, gv, key, smp):
      return rcnn_targets(
          p, pv, gb, gl, gv, rng=key, sampled=smp,
          pos_iou_thr=rc.pos_iou_thr, neg_iou_thr=rc.neg_iou_thr,
          min_pos_iou=rc.min_pos_iou, num_samples=rc.num_samples,
          pos_fraction=rc.pos_fraction, num_classes=self.num_classes,
          target_stds=tuple(box_cfg.target_stds))
    return jax.vmap(one)(proposals['boxes'], proposals['valid'], gt['boxes'],
                         gt['labels'], gt['valid'],
                         jax.random.split(rng, gt['boxes'].shape[0]), sampled)

  def _box_losses(self, feats, samples, pad_shape) -> dict:
    c, lw = self.config, self.train_cfg.loss_weights
    bbox_feats = self.roi_features(feats, samples['rois'], pad_shape,
                                   c.bbox_roi_extractor.output_size)
    cls_logits, deltas = self.bbox_head(bbox_feats)
    loss = box_head_lib.rcnn_loss(
        cls_logits, deltas, samples['labels'], samples['label_weights'],
        samples['bbox_targets'], samples['bbox_weights'],
        self.num_classes)
    return dict(loss_cls=lw.cls * loss['loss_cls'],
                loss_bbox=lw.bbox * loss['loss_bbox'], rcnn_acc=loss['acc'])

  def _mask_losses(self, feats, samples, pad_shape, gt) -> dict:
    """Mask and MaskIoU losses on the positives, which always sit in the
    first ``num_samples * pos_fraction`` slots (spec §3.3, §3.4)."""
    c, rc = self.config, self.train_cfg.rcnn
    lw = self.train_cfg.loss_weights
    npos = int(rc.num_samples * rc.pos_fraction)
    rois = samples['rois'][:, :npos]
    valid = samples['is_pos'][:, :npos]
    gt_idx = samples['pos_assigned_gt'][:, :npos]
    labels = jnp.where(valid, samples['labels'][:, :npos], 0)
    mask_feats = self.roi_features(feats, rois, pad_shape,
                                   c.mask_roi_extractor.output_size)
    mask_logits = select_class(self.mask_head(mask_feats), labels)
    mask_t = jax.vmap(
        lambda r, g, gm, fr, ps, v: mask_head_lib.mask_targets(
            r, g, gm, fr, ps, mask_size=rc.mask_size, valid=v))(
                rois, gt_idx, gt['masks'], gt['mask_frames'], pad_shape,
                valid)
    loss_mask = mask_head_lib.mask_loss(mask_logits, mask_t, valid)
    num_pos = jnp.mean(jnp.sum(valid, -1).astype(jnp.float32))
    if not self.with_mask_iou:
      return dict(loss_mask=lw.mask * loss_mask, num_rcnn_pos=num_pos)
    iou_pred = select_class(self.mask_iou_head(mask_feats, mask_logits),
                            labels)
    iou_t = jax.vmap(
        lambda r, g, ml, mt, gm, fr, ps, v: maskiou_head_lib.maskiou_targets(
            r, g, ml, mt, gm, fr, ps, valid=v,
            mask_thr_binary=rc.mask_thr_binary))(
                rois, gt_idx, jax.lax.stop_gradient(
                    mask_logits.astype(jnp.float32)), mask_t, gt['masks'],
                gt['mask_frames'], pad_shape, valid)
    loss_mask_iou = maskiou_head_lib.maskiou_loss(
        iou_pred, iou_t, valid, loss_weight=lw.mask_iou)
    return dict(
        loss_mask=lw.mask * loss_mask, loss_mask_iou=loss_mask_iou,
        num_rcnn_pos=num_pos)
