"""MaskIoUHead: predicts the IoU of each class's mask (spec §1.6, §5.14),
with its training targets (``maskiou_targets``) and loss (``maskiou_loss``).

Params: ``convs_0..3`` (plain 3x3 convs, pad 1, bias; ``convs_3`` stride 2),
``fcs_0``, ``fcs_1`` (ReLU), ``fc_mask_iou`` (linear, 80 outputs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrcnn_jax.modeling import layers
from msrcnn_jax.modeling.heads.box_head import flatten_nchw
from msrcnn_jax.ops.masks import crop_geometry


class MaskIoUHead(nn.Module):
  """MaskIoU head of MS R-CNN.

  Attributes:
    num_convs: 3x3 convs (4); the last has stride 2.
    num_fcs: hidden FCs (2).
    conv_out_channels: conv width (256).
    fc_out_channels: FC width (1024).
    num_classes: outputs (80).
    dtype: computation dtype.
  """
  num_convs: int = 4
  num_fcs: int = 2
  conv_out_channels: int = 256
  fc_out_channels: int = 1024
  num_classes: int = 80
  dtype: Any = jnp.float32

  def setup(self):
    self.convs = [
        layers.conv(self.conv_out_channels, 3,
                    stride=(2 if i == self.num_convs - 1 else 1),
                    dtype=self.dtype)
        for i in range(self.num_convs)]
    self.fcs = [nn.Dense(self.fc_out_channels,
                         kernel_init=layers.CAFFE2_XAVIER, dtype=self.dtype,
                         param_dtype=jnp.float32)
                for _ in range(self.num_fcs)]
    self.fc_mask_iou = nn.Dense(self.num_classes,
                                kernel_init=nn.initializers.normal(0.01),
                                dtype=self.dtype, param_dtype=jnp.float32)

  def __call__(self, roi_feats: jnp.ndarray,
               mask_logits: jnp.ndarray) -> jnp.ndarray:
    """Predicted mask IoUs.

    Args:
      roi_feats: ``(..., 14, 14, C)`` the mask RoIAlign features that fed
        the mask head.
      mask_logits: ``(..., 28, 28)`` logits of one class per RoI (the
        predicted class at test time, the GT class in training).

    Returns:
      ``(..., num_classes)`` float32 IoU predictions (no activation).
    """
    lead = roi_feats.shape[:-3]
    feats = roi_feats.reshape((-1,) + roi_feats.shape[-3:])
    mask = jax.nn.sigmoid(mask_logits.reshape((-1,) + mask_logits.shape[-2:]))
    # MaxPool2d(2, 2): 28x28 -> 14x14.
    n, h, w = mask.shape
    pooled = mask.reshape(n, h // 2, 2, w // 2, 2).max(axis=(2, 4))
    # The mask is the LAST channel: [mask_feat (C), pooled mask (1)].
    x = jnp.concatenate([feats.astype(self.dtype),
                         pooled[..., None].astype(self.dtype)], axis=-1)
    for conv in self.convs:
      x = nn.relu(conv(x))
    x = flatten_nchw(x)
    for fc in self.fcs:
      x = nn.relu(fc(x))
    out = self.fc_mask_iou(x).astype(jnp.float32)
    return out.reshape(lead + out.shape[-1:])


def area_ratios(pos_rois: jnp.ndarray,
                pos_assigned_gt: jnp.ndarray,
                gt_masks: jnp.ndarray,
                mask_frames: jnp.ndarray,
                pad_hw) -> jnp.ndarray:
  """Share of each GT's pixels inside its RoI (``MaskIoUHead._get_area_ratio``).

  mmdetection truncates the RoI to int32, clips it to the padded mask size
  and counts GT pixels in rows ``y1:y1+max(y2-y1,1)``, columns
  ``x1:x1+max(x2-x1,1)``, over all GT pixels + 1e-7 (spec §3.4). Here every
  crop cell contributes its mask value times the pixel area of its overlap
  with that integer window, which is exact when cells are pixels (exact
  mode) and an area-weighted estimate for box crops.

  Args:
    pos_rois, pos_assigned_gt, gt_masks, mask_frames, pad_hw: as
      ``mask_head.mask_targets``.

  Returns:
    ``(P,)`` float32.
  """
  gt_masks = jnp.asarray(gt_masks)
  mask_frames = jnp.asarray(mask_frames)
  num_gt, mh, mw = gt_masks.shape
  pad_h = jnp.asarray(pad_hw)[0].astype(jnp.float32)
  pad_w = jnp.asarray(pad_hw)[1].astype(jnp.float32)
  g = jnp.clip(pos_assigned_gt, 0, num_gt - 1)
  b = jnp.trunc(pos_rois.astype(jnp.float32))
  x1 = jnp.clip(b[:, 0], 0, pad_w)
  y1 = jnp.clip(b[:, 1], 0, pad_h)
  x2 = jnp.clip(b[:, 2], 0, pad_w)
  y2 = jnp.clip(b[:, 3], 0, pad_h)
  x2 = jnp.minimum(x1 + jnp.maximum(x2 - x1, 1.0), pad_w)
  y2 = jnp.minimum(y1 + jnp.maximum(y2 - y1, 1.0), pad_h)
  fx, fy, cw, ch = crop_geometry(mask_frames, g, (mh, mw))
  jx = jnp.arange(mw, dtype=jnp.float32)
  jy = jnp.arange(mh, dtype=jnp.float32)
  lo_x = fx[:, None] + jx[None] * cw[:, None]
  lo_y = fy[:, None] + jy[None] * ch[:, None]
  lx = jnp.clip(jnp.minimum(lo_x + cw[:, None], x2[:, None])
                - jnp.maximum(lo_x, x1[:, None]), 0)          # (P, Mw)
  ly = jnp.clip(jnp.minimum(lo_y + ch[:, None], y2[:, None])
                - jnp.maximum(lo_y, y1[:, None]), 0)          # (P, Mh)
  m = gt_masks[g].astype(jnp.float32)                          # (P, Mh, Mw)
  hi = jax.lax.Precision.HIGHEST
  inside = jnp.einsum('pij,pi,pj->p', m, ly, lx, precision=hi)
  total = jnp.sum(m, axis=(1, 2)) * cw * ch
  return inside / (total + 1e-7)


def maskiou_targets(pos_rois: jnp.ndarray,
                    pos_assigned_gt: jnp.ndarray,
                    mask_logits: jnp.ndarray,
                    mask_targets_: jnp.ndarray,
                    gt_masks: jnp.ndarray,
                    mask_frames: jnp.ndarray,
                    pad_hw,
                    valid: jnp.ndarray | None = None,
                    mask_thr_binary: float = 0.5) -> jnp.ndarray:
  """MaskIoU targets of one image (spec §3.4, ``MaskIoUHead.get_targets``).

  ``pred = logits > mask_thr_binary`` (on logits, as mmdetection, §5.16);
  ``gt_full = sum(target) / (area_ratio + 1e-7)``;
  ``iou = overlap / (pred_area + gt_full - overlap)``. Where mmdetection would
  divide 0 by 0 (NaN, later excluded by ``target > 0``) this returns 0.

  Args:
    pos_rois: ``(P, 4)`` positive RoIs, train scale.
    pos_assigned_gt: ``(P,)`` int32 0-based GT index.
    mask_logits: ``(P, 28, 28)`` mask-head logits of each RoI's GT class.
    mask_targets_: ``(P, 28, 28)`` from ``mask_head.mask_targets``.
    gt_masks, mask_frames, pad_hw: as ``mask_head.mask_targets``.
    valid: optional ``(P,)`` bool; invalid rows get 0.
    mask_thr_binary: ``train_cfg.rcnn.mask_thr_binary``.

  Returns:
    ``(P,)`` float32, no gradient.
  """
  ratio = area_ratios(pos_rois, pos_assigned_gt, gt_masks, mask_frames,
                      pad_hw)
  pred = (mask_logits > mask_thr_binary).astype(jnp.float32)
  t = mask_targets_.astype(jnp.float32)
  pred_area = jnp.sum(pred, axis=(1, 2))
  overlap = jnp.sum(pred * t, axis=(1, 2))
  gt_full = jnp.sum(t, axis=(1, 2)) / (ratio + 1e-7)
  denom = pred_area + gt_full - overlap
  iou = jnp.where(denom > 0, overlap / jnp.where(denom > 0, denom, 1.0), 0.0)
  if valid is not None:
    iou = jnp.where(valid, iou, 0.0)
  return jax.lax.stop_gradient(iou)


def maskiou_loss(iou_pred: jnp.ndarray,
                 iou_targets: jnp.ndarray,
                 valid: jnp.ndarray,
                 loss_weight: float = 0.5) -> jnp.ndarray:
  """MaskIoU MSE (spec §3.4, ``MaskIoUHead.loss``): mean over RoIs with
  target > 0, times ``loss_weight``.

  Args:
    iou_pred: ``(..., P)`` MaskIoU head output of each RoI's GT class.
    iou_targets: ``(..., P)`` from ``maskiou_targets``.
    valid: ``(..., P)`` bool, the positive RoIs.
    loss_weight: 0.5.

  Returns:
    scalar; 0 when no RoI has a positive target.
  """
  sel = valid & (iou_targets > 0)
  se = jnp.square(iou_pred.astype(jnp.float32) - iou_targets) * sel
  num = jnp.sum(sel).astype(jnp.float32)
  return loss_weight * jnp.sum(se) / jnp.maximum(num, 1.0)
