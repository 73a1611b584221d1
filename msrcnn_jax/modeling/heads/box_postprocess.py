"""Box head post-processing: per-class decode, rescale, multiclass NMS.

mmdetection v2 ``BBoxHead.get_bboxes`` + ``multiclass_nms`` with
``rescale=True`` (spec §2.4, §2.6, §5.12), batched and static-shape:

1. softmax over the 81 logits; background (last column) dropped;
2. per-class boxes decoded from the RoIs with stds (0.1, 0.1, 0.2, 0.2), the
   dw/dh clamp and the clip to ``img_shape``;
3. divided by ``scale_factor`` **before** NMS, so NMS runs in original-image
   coordinates;
4. candidates ``(roi, class)`` in proposal-major, class-minor order with score
   ``> score_thr`` (strict); ``batched_nms`` by class with the class-offset
   trick (offset ``label * (max coordinate over passing candidates + 1)``,
   float32); sorted by score; the first ``max_per_img`` kept.

Static candidate cap: at most ``max_candidates`` passing candidates, the
highest-scoring ones (ties: proposal-major order, as mmdetection's stable
order), enter NMS. Greedy NMS never lets a lower-scored box suppress a
higher-scored one, so the result is exactly mmdetection's whenever at most
``max_candidates`` candidates pass the threshold, or the top
``max_candidates`` already yield ``max_per_img`` detections; otherwise the
tail of the detection list may miss boxes that only the dropped candidates
would have supplied. The offset uses the max coordinate over *all* passing
candidates, as mmdetection.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from msrcnn_jax.ops import boxes as boxes_lib
from msrcnn_jax.ops import nms as nms_lib


def _single_image(rois, roi_valid, cls_logits, deltas, img_shape,
                  scale_factor, *, score_thr, iou_threshold, max_per_img,
                  max_candidates, target_means, target_stds, block_size):
  """``get_detections`` for one image (all arrays without batch axis)."""
  r, c1 = cls_logits.shape
  c = c1 - 1
  scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[:, :c]
  boxes = boxes_lib.decode_deltas(
      jnp.broadcast_to(rois[:, None, :].astype(jnp.float32), (r, c, 4)),
      deltas.reshape(r, c, 4).astype(jnp.float32), target_means, target_stds,
      max_shape=img_shape)
  boxes = boxes / scale_factor.astype(jnp.float32)  # spec §2.4 step 3
  boxes = boxes.reshape(r * c, 4)
  scores = scores.reshape(r * c)
  passing = (scores > score_thr) & jnp.repeat(roi_valid, c)
  labels = jnp.tile(jnp.arange(c, dtype=jnp.int32), r)

  k = min(max_candidates, r * c)
  top, idx = jax.lax.top_k(jnp.where(passing, scores, -jnp.inf), k)
  cand_valid = top > -jnp.inf
  cand_boxes = boxes[idx]
  cand_labels = labels[idx]
  # Offsets from the max over all passing candidates (spec §2.6).
  offsets = nms_lib.batch_offsets(cand_labels, boxes, passing)
  keep, keep_valid = nms_lib.nms_sorted(
      cand_boxes + offsets[:, None], cand_valid, iou_threshold,
      max_per_img, block_size)
  vf = keep_valid.astype(jnp.float32)
  return dict(boxes=cand_boxes[keep] * vf[:, None],
              scores=top[keep] * vf,
              labels=jnp.where(keep_valid, cand_labels[keep], 0),
              valid=keep_valid)


def get_detections(rois: jnp.ndarray,
                   roi_valid: jnp.ndarray,
                   cls_logits: jnp.ndarray,
                   deltas: jnp.ndarray,
                   img_shape: jnp.ndarray,
                   scale_factor: jnp.ndarray,
                   score_thr: float = 0.05,
                   iou_threshold: float = 0.5,
                   max_per_img: int = 100,
                   max_candidates: int = 8000,
                   target_means: Sequence[float] = (0., 0., 0., 0.),
                   target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                   block_size: int = nms_lib.DEFAULT_BLOCK_SIZE
                   ) -> dict[str, jnp.ndarray]:
  """Final detections of a batch (spec §2.4), static shapes.

  Args:
    rois: ``(B, R, 4)`` float32 proposals x1,y1,x2,y2 at test scale.
    roi_valid: ``(B, R)`` bool; invalid RoIs never produce detections.
    cls_logits: ``(B, R, C + 1)`` logits, background last.
    deltas: ``(B, R, 4C)`` class-specific deltas (class c at ``4c:4c+4``).
    img_shape: ``(B, 2)`` int resized (h, w) before padding (clip limits).
    scale_factor: ``(B, 4)`` float32 ``(w_s, h_s, w_s, h_s)``.
    score_thr: candidates need score > score_thr (strict).
    iou_threshold: NMS IoU threshold, suppress when IoU > it.
    max_per_img: detections per image ``K``.
    max_candidates: static cap on candidates entering NMS, taken by score
      (config ``test.rcnn.max_candidates``); see the module docstring.
    target_means, target_stds: delta normalisation of the box head.
    block_size: NMS block length.

  Returns:
    dict with ``boxes (B, K, 4)`` float32 x1,y1,x2,y2 in ORIGINAL image
    pixels, ``scores (B, K)`` float32 softmax scores, ``labels (B, K)`` int32
    0..C-1, ``valid (B, K)`` bool; sorted by descending score; padding rows
    are zero with ``valid`` False.
  """
  fn = jax.vmap(lambda *a: _single_image(
      *a, score_thr=score_thr, iou_threshold=iou_threshold,
      max_per_img=max_per_img, max_candidates=max_candidates,
      target_means=tuple(target_means), target_stds=tuple(target_stds),
      block_size=block_size))
  return fn(jnp.asarray(rois), jnp.asarray(roi_valid, bool),
            jnp.asarray(cls_logits), jnp.asarray(deltas),
            jnp.asarray(img_shape), jnp.asarray(scale_factor))
