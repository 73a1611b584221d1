"""Training targets of the RPN, the box head, the mask head and MaskIoU head.

Everything is per image, static-shape and jit-safe (``jax.vmap`` over the
batch, splitting the PRNG key per image). Ground truth arrives padded:

- ``gt_boxes`` ``(G, 4)`` float32 (x1, y1, x2, y2) at train scale (the resized
  image), ``gt_labels`` ``(G,)`` int32 in 0..79, ``gt_valid`` ``(G,)`` bool;
  padded rows may hold anything.
- ``gt_masks`` ``(G, Mh, Mw)`` uint8/bool/float: crop ``g`` covers exactly its
  frame box ``mask_frames[g]`` ``(x1, y1, x2, y2)`` train-scale pixels, cell
  ``(i, j)`` covering ``[fx1 + j * fw / Mw, fx1 + (j + 1) * fw / Mw)`` (and the
  same in y). By default the frame is the GT box and the crop ``112 x 112``;
  in the exact mode the frame is the whole padded image ``[0, 0, W_pad,
  H_pad]`` and the crop the full-resolution bitmap, which reproduces
  mmdetection bit for bit (spec §3.3, §3.4).

Sampled RoIs come as ``num`` fixed slots with a validity mask, ordered
[positives; negatives; padding] as mmdetection's ``SamplingResult.bboxes``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from msrcnn_jax.ops import matching
from msrcnn_jax.ops.boxes import box_iou, clip_boxes, encode_deltas
from msrcnn_jax.ops.roi_align import roi_align


def _sample(rng, sampled, pos_mask, neg_mask, num, pos_fraction):
  if sampled is not None:
    indices, is_pos, valid = (jnp.asarray(a) for a in sampled)
    return indices.astype(jnp.int32), is_pos & valid, valid
  if rng is None:
    raise ValueError('pass either rng or sampled')
  return matching.sample_fixed(rng, pos_mask, neg_mask, num, pos_fraction)


def rpn_targets(anchors: jnp.ndarray,
                valid_flags: jnp.ndarray,
                gt_boxes: jnp.ndarray,
                gt_valid: jnp.ndarray,
                rng: jax.Array | None = None,
                sampled=None,
                pos_iou_thr: float = 0.7,
                neg_iou_thr: float = 0.3,
                min_pos_iou: float = 0.3,
                num_samples: int = 256,
                pos_fraction: float = 0.5,
                target_stds: Sequence[float] = (1., 1., 1., 1.)) -> dict:
  """RPN anchor targets of one image (spec §3.1, ``AnchorHead.get_targets``).

  Invalid anchors (outside the per-image valid grid, ``allowed_border=-1``)
  are excluded from assignment and sampling and get zero weights.

  Args:
    anchors: ``(N, 4)`` all levels concatenated (level-major, (y, x, a)),
      train-scale pixels.
    valid_flags: ``(N,)`` bool.
    gt_boxes, gt_valid: ``(G, 4)``, ``(G,)`` (module docstring).
    rng: PRNG key for the random sampler (ignored when ``sampled`` is given).
    sampled: optional ``(indices, is_pos, valid)`` of ``num_samples`` slots
      (``matching.pack_sampled``) to use instead of drawing.
    pos_iou_thr, neg_iou_thr, min_pos_iou: ``train_cfg.rpn.assigner``.
    num_samples, pos_fraction: ``train_cfg.rpn.sampler``.
    target_stds: delta normalisation (RPN: 1).

  Returns:
    dict with
    - ``labels`` ``(N,)`` float32 BCE target: 1 for sampled positives, 0
      elsewhere (mmdetection's label 0 "foreground" / 1 "background");
    - ``label_weights`` ``(N,)`` float32: 1 on sampled anchors, else 0;
    - ``bbox_targets`` ``(N, 4)`` float32 encoded deltas, 0 off positives;
    - ``bbox_weights`` ``(N, 4)`` float32: 1 on sampled positives;
    - ``assigned_gt`` ``(N,)`` int32 (-1/0/i+1), ``max_overlaps`` ``(N,)``;
    - ``num_pos``, ``num_neg``: int32 scalars, the sampled counts.
  """
  n = anchors.shape[0]
  ious = box_iou(gt_boxes, anchors)
  assigned, max_overlaps = matching.max_iou_assign(
      ious, gt_valid, pos_iou_thr, neg_iou_thr, min_pos_iou,
      box_valid=valid_flags)
  indices, is_pos, valid = _sample(rng, sampled, assigned > 0, assigned == 0,
                                   num_samples, pos_fraction)
  drop = jnp.where(valid, indices, n)   # out of range -> dropped
  pos = jnp.zeros((n,), bool).at[drop].set(is_pos, mode='drop')
  sel = jnp.zeros((n,), bool).at[drop].set(True, mode='drop')
  gt_idx = jnp.clip(assigned - 1, 0, max(gt_boxes.shape[0] - 1, 0))
  if gt_boxes.shape[0] == 0:
    deltas = jnp.zeros((n, 4), jnp.float32)
  else:
    # Non-positives encode against themselves (finite; zeroed below).
    matched = jnp.where(pos[:, None], gt_boxes[gt_idx], anchors)
    deltas = encode_deltas(anchors, matched, stds=target_stds)
  deltas = jnp.where(pos[:, None], deltas, 0.0)
  posf = pos.astype(jnp.float32)
  return dict(
      labels=posf,
      label_weights=sel.astype(jnp.float32),
      bbox_targets=deltas,
      bbox_weights=jnp.broadcast_to(posf[:, None], (n, 4)),
      assigned_gt=assigned,
      max_overlaps=max_overlaps,
      num_pos=jnp.sum(pos).astype(jnp.int32),
      num_neg=jnp.sum(sel & ~pos).astype(jnp.int32))


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
  """Box-head targets of one image (spec §3.2).

  The proposals are assigned alone (low-quality matching among proposals
  only, as mmdetection); then the GT boxes are prepended as extra proposals
  with ``gt_inds`` 1..G and IoU 1 (``add_gt_as_proposals``), and
  ``num_samples`` RoIs are drawn from the ``G + N`` candidates.

  Args:
    proposals: ``(N, 4)`` train-scale proposals (e.g. N = 1000), detached.
    proposal_valid: ``(N,)`` bool; padded proposals are never sampled.
    gt_boxes, gt_labels, gt_valid: ``(G, 4)``, ``(G,)``, ``(G,)``.
    rng: PRNG key for the sampler (ignored when ``sampled`` is given).
    sampled: optional ``(indices, is_pos, valid)``, indices into
      ``[gt_boxes; proposals]`` (mmdetection's ``rcnn.sample.*``).
    pos_iou_thr, neg_iou_thr, min_pos_iou: ``train_cfg.rcnn.assigner``.
    num_samples, pos_fraction: ``train_cfg.rcnn.sampler``.
    num_classes: background label = ``num_classes``.
    target_stds: box-coder stds.

  Returns:
    dict, S = ``num_samples``, slots [positives; negatives; padding]; the
    positives always lie within the first ``int(S * pos_fraction)`` slots:
    - ``rois`` ``(S, 4)`` train-scale boxes (padding: 0);
    - ``roi_valid`` ``(S,)`` bool, ``is_pos`` ``(S,)`` bool;
    - ``labels`` ``(S,)`` int32: GT label for positives, ``num_classes``
      otherwise; ``label_weights`` ``(S,)`` float32 1 on valid slots;
    - ``bbox_targets`` ``(S, 4)``, ``bbox_weights`` ``(S, 4)`` (positives);
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
  indices, is_pos, valid = _sample(rng, sampled, assigned > 0, assigned == 0,
                                   num_samples, pos_fraction)
  rois = jnp.where(valid[:, None], boxes[indices], 0.0)
  gt_idx = jnp.where(is_pos, jnp.clip(assigned[indices] - 1, 0), 0)
  labels = jnp.where(is_pos, gt_labels[gt_idx].astype(jnp.int32),
                     num_classes)
  deltas = encode_deltas(jnp.where(is_pos[:, None], rois, 1.0),
                         jnp.where(is_pos[:, None], gt_boxes[gt_idx], 1.0),
                         stds=target_stds)
  posf = is_pos.astype(jnp.float32)
  return dict(
      rois=rois,
      roi_valid=valid,
      is_pos=is_pos,
      labels=labels,
      label_weights=valid.astype(jnp.float32),
      bbox_targets=jnp.where(is_pos[:, None], deltas, 0.0),
      bbox_weights=jnp.broadcast_to(posf[:, None], (num_samples, 4)),
      pos_assigned_gt=gt_idx.astype(jnp.int32),
      sampled_inds=indices,
      assigned_gt=assigned,
      max_overlaps=max_overlaps)


def _crop_geometry(mask_frames, g, shape_hw):
  """Frame origin and cell size (pixels) of the crops of GT indices ``g``."""
  frames = mask_frames[g].astype(jnp.float32)
  mh, mw = shape_hw
  cw = jnp.maximum(frames[:, 2] - frames[:, 0], 1e-6) / mw
  ch = jnp.maximum(frames[:, 3] - frames[:, 1], 1e-6) / mh
  return frames[:, 0], frames[:, 1], cw, ch


def mask_targets(pos_rois: jnp.ndarray,
                 pos_assigned_gt: jnp.ndarray,
                 gt_masks: jnp.ndarray,
                 mask_frames: jnp.ndarray,
                 pad_hw,
                 mask_size: int = 28,
                 valid: jnp.ndarray | None = None,
                 max_samples: int | None = None) -> jnp.ndarray:
  """Mask-head targets (spec §3.3, ``mask_target`` + ``crop_and_resize``).

  Each RoI is clipped to the padded image ``[0, W_pad] x [0, H_pad]``, mapped
  into its GT crop's cell coordinates and RoIAligned from the crop
  (``aligned=True``, adaptive sampling, avg) to ``mask_size`` squared, then
  binarised at ``>= 0.5``. In the exact mode (frame = padded image, crop =
  full bitmap) this is mmdetection's computation. With box crops the
  sampling grid follows the crop's cells (the adaptive count is taken in crop
  cells) and GT pixels outside the frame count as 0, an approximation
  measured in ``tests/test_training_targets.py``.

  Args:
    pos_rois: ``(P, 4)`` positive RoIs, train scale (e.g. the first 128
      slots of ``rcnn_targets``).
    pos_assigned_gt: ``(P,)`` int32 0-based GT index.
    gt_masks: ``(G, Mh, Mw)`` crops (module docstring).
    mask_frames: ``(G, 4)`` frame boxes of the crops.
    pad_hw: ``(2,)`` (h, w) of the image's ``pad_shape`` (mmdetection's
      mask size the proposal is clipped to).
    mask_size: output side (28).
    valid: optional ``(P,)`` bool; invalid rows come out 0.
    max_samples: static cap of RoIAlign's adaptive samples per bin side.
      Default ``ceil(2 * max(Mh, Mw) / mask_size)``: enough for positives
      (IoU >= 0.5 bounds a RoI's side by twice the GT box side) in crop mode
      and for any clipped RoI in the exact mode.

  Returns:
    ``(P, mask_size, mask_size)`` float32 in {0, 1}.
  """
  gt_masks = jnp.asarray(gt_masks)
  mask_frames = jnp.asarray(mask_frames)
  num_gt, mh, mw = gt_masks.shape
  p = pos_rois.shape[0]
  if max_samples is None:
    max_samples = int(math.ceil(2 * max(mh, mw) / mask_size))
  g = jnp.clip(pos_assigned_gt, 0, num_gt - 1)
  rois = clip_boxes(pos_rois.astype(jnp.float32), jnp.asarray(pad_hw))
  fx, fy, cw, ch = _crop_geometry(mask_frames, g, (mh, mw))
  crop_boxes = jnp.stack([(rois[:, 0] - fx) / cw, (rois[:, 1] - fy) / ch,
                          (rois[:, 2] - fx) / cw, (rois[:, 3] - fy) / ch],
                         axis=-1)

  def one(gi, box):
    m = gt_masks[gi].astype(jnp.float32)[:, :, None]
    return roi_align(m, box[None], 1.0, mask_size, max_samples,
                     valid_hw=(mh, mw), sampling_ratio=0,
                     aligned=True)[0, :, :, 0]

  out = jax.vmap(one)(g, crop_boxes)
  out = (out >= 0.5).astype(jnp.float32)
  if valid is not None:
    out = jnp.where(valid[:, None, None], out, 0.0)
  assert out.shape == (p, mask_size, mask_size)
  return jax.lax.stop_gradient(out)


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
  fx, fy, cw, ch = _crop_geometry(mask_frames, g, (mh, mw))
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
  """MaskIoU targets (spec §3.4, ``MaskIoUHead.get_targets``).

  ``pred = logits > mask_thr_binary`` (on logits, as mmdetection, §5.16);
  ``gt_full = sum(target) / (area_ratio + 1e-7)``;
  ``iou = overlap / (pred_area + gt_full - overlap)``. Where mmdetection would
  divide 0 by 0 (NaN, later excluded by ``target > 0``) this returns 0.

  Args:
    pos_rois: ``(P, 4)`` positive RoIs, train scale.
    pos_assigned_gt: ``(P,)`` int32 0-based GT index.
    mask_logits: ``(P, 28, 28)`` mask-head logits of each RoI's GT class.
    mask_targets_: ``(P, 28, 28)`` from ``mask_targets``.
    gt_masks, mask_frames, pad_hw: as ``mask_targets``.
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
