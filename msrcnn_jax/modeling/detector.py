"""The spine: MaskScoringRCNN = backbone -> FPN -> RPN stage -> RoI stage.

Inference reproduces mmdetection 2.x ``MaskScoringRCNN.simple_test`` with
``rescale=True`` (spec §2) on a padded, bucketed batch with static shapes:

  images (B, H, W, 3) --backbone/FPN--> P2..P6
  --RPN stage (rpn.py)--> proposals (B, 1000, 4) test scale + validity
  --RoI stage (roi_heads.py)--> detections (B, 100), masks, MaskIoU, scores.

Training (spec §3) runs the same stages with the ground truth: each stage
computes its own targets and losses and returns them in a dict; the spine
only merges the dicts and sums the ``loss_*`` entries.

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

from msrcnn_jax.modeling.backbone import resnet_from_config
from msrcnn_jax.modeling.fpn import FPN
from msrcnn_jax.modeling.roi_heads import MaskScoringRoIHead
from msrcnn_jax.modeling.rpn import RPN


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
    m, c = self.config.model, self.config
    self.backbone = self.backbone_fn(m.backbone, self.dtype)
    self.neck = FPN(in_channels=tuple(m.neck.in_channels),
                    out_channels=m.neck.out_channels,
                    num_outs=m.neck.num_outs, dtype=self.dtype)
    # The converter builds the model from ``config.model`` alone.
    train, test = c.get('train'), c.get('test')
    self.rpn_head = RPN(m.rpn_head, train_cfg=train,
                        test_cfg=None if test is None else test.rpn,
                        dtype=self.dtype)
    self.roi_head = MaskScoringRoIHead(
        m.roi_head, num_classes=m.num_classes, train_cfg=train,
        test_cfg=None if test is None else test.rcnn, dtype=self.dtype)

  def features(self, images: jnp.ndarray, pad_shape: jnp.ndarray):
    """Backbone + FPN.

    Args:
      images: ``(B, H, W, 3)`` float, normalised, zero padded.
      pad_shape: ``(B, 2)`` int32 per-image /32-padded (h, w).

    Returns:
      ``[P2, ..., P6]``, each ``(B, H/s, W/s, C)`` (P6: ``ceil``).
    """
    return self.neck(self.backbone(images, pad_shape), pad_shape)

  def __call__(self, images, img_shape, pad_shape, scale_factor,
               return_intermediates: bool = False) -> dict[str, Any]:
    """Inference (spec §2).

    Args:
      images: ``(B, H, W, 3)`` float32 normalised, zero padded to a bucket.
      img_shape: ``(B, 2)`` int32 resized (h, w) before padding.
      pad_shape: ``(B, 2)`` int32 resized (h, w) padded to /32.
      scale_factor: ``(B, 4)`` float32 (w_scale, h_scale, w_scale, h_scale).
      return_intermediates: also return the proposals, the box head's
        outputs, the mask RoIs and the features.

    Returns:
      ``MaskScoringRoIHead.simple_test``'s dict: for ``K =
      test.rcnn.max_per_img``, ``boxes (B, K, 4)`` in ORIGINAL image
      pixels, ``scores``, ``labels``, ``valid``, ``mask_logits (B, K, 28,
      28)``, ``mask_iou``, ``mask_iou_all (B, K, num_classes)``,
      ``mask_scores``, ``paste_boxes``; padding rows zero. Intermediates:
      ``proposals``, ``proposal_scores``, ``proposal_valid``,
      ``bbox_cls_logits``, ``bbox_deltas``, ``mask_rois``, ``features``.
    """
    feats = self.features(images, pad_shape)
    proposals, _ = self.rpn_head(feats, img_shape, pad_shape)
    out, _ = self.roi_head(feats, proposals, img_shape, pad_shape,
                           scale_factor,
                           return_intermediates=return_intermediates)
    if return_intermediates:
      out.update(proposals=proposals['boxes'],
                 proposal_scores=proposals['scores'],
                 proposal_valid=proposals['valid'], features=feats)
    return out

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
        ``rpn.rpn_targets``/``roi_heads.rcnn_targets`` take them, and
        optionally ``proposals``/``proposal_valid`` to replace the RPN's
        proposals.

    Returns:
      ``(total_loss, metrics)``; metrics hold every loss term and
      ``rcnn_acc``, ``num_rpn_pos``, ``num_rcnn_pos``.
    """
    gt_boxes = batch['gt_boxes'].astype(jnp.float32)
    # A zero-width or zero-height box cannot be regressed to (log 0 in the
    # box targets): such a row counts as padding, as the COCO loader already
    # drops ``w < 1 or h < 1`` annotations (mmdetection _parse_ann_info).
    gt_valid = (batch['gt_valid'].astype(bool)
                & (gt_boxes[..., 2] > gt_boxes[..., 0])
                & (gt_boxes[..., 3] > gt_boxes[..., 1]))
    gt = dict(boxes=gt_boxes, labels=batch['gt_labels'].astype(jnp.int32),
              valid=gt_valid, masks=batch['gt_masks'],
              mask_frames=batch.get('gt_mask_frames', gt_boxes))
    img_shape, pad_shape = batch['img_shape'], batch['pad_shape']
    rng_rpn, rng_rcnn = jax.random.split(rng)
    feats = self.features(batch['image'], pad_shape)
    proposals, rpn_losses = self.rpn_head(feats, img_shape, pad_shape, gt,
                                          rng_rpn, sampled)
    _, roi_losses = self.roi_head(feats, proposals, img_shape, pad_shape,
                                  gt=gt, rng=rng_rcnn, sampled=sampled)
    metrics = {**rpn_losses, **roi_losses}
    total = sum(v for k, v in metrics.items() if k.startswith('loss_'))
    return total, metrics

  def init_all(self, images, pad_shape):
    """Touches every submodule once so ``init`` creates every parameter."""
    feats = self.features(images, pad_shape)
    self.rpn_head.head(feats)
    c = feats[0].shape[-1]
    bbox = jnp.zeros((1, 7, 7, c), images.dtype)
    mask = jnp.zeros((1, 14, 14, c), images.dtype)
    return self.roi_head.init_heads(bbox, mask)


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array,
                   image_hw=(64, 64)) -> dict:
  """Randomly initialised ``{'params', 'batch_stats'}`` for ``config``."""
  model = MaskScoringRCNN(config)
  images = jnp.zeros((1,) + tuple(image_hw) + (3,), jnp.float32)
  pad = jnp.asarray([image_hw], jnp.int32)
  return model.init(rng, images, pad, method=MaskScoringRCNN.init_all)
