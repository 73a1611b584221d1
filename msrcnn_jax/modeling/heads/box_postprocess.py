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

Candidates are ranked by float32 score, as mmdetection, and at exact score
ties by the log-odds ``log(p / (1 - p))`` of the score computed from the
logits (``_log_odds``), which confident scores do not saturate: logits 20
and 25 against 0 both give the score 1.0 but log-odds 20 and 25.
mmdetection sorts with unstable sorts (``scores.sort`` in mmcv's NMS), so its
order at exact score ties is not reproducible; equal log-odds here keep
proposal-major order (lower index first).

Static candidate cap: at most ``max_candidates`` passing candidates, the
highest-scoring ones, enter NMS. Greedy NMS never lets a lower-scored box
suppress a higher-scored one, so the result is exactly mmdetection's
whenever at most ``max_candidates`` candidates pass the threshold, or the
top ``max_candidates`` already yield ``max_per_img`` detections; otherwise
the tail of the detection list may miss boxes that only the dropped
candidates would have supplied. The offset uses the max coordinate over *all* passing
candidates, as mmdetection.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from msrcnn_jax.ops import boxes as boxes_lib
from msrcnn_jax.ops import nms as nms_lib


def _log_odds(cls_logits: jnp.ndarray) -> jnp.ndarray:
  """``log(p_c / (1 - p_c))`` of the softmax of ``(R, C + 1)`` logits.

  ``= x_c - logsumexp_{j != c} x_j``, computed without saturating: for the
  argmax column directly; for the others (``p_c <= 0.5``) as
  ``x_c - lse - log1p(-p_c)``.
  """
  x = cls_logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
  top = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=bool)
  lse_others = jax.nn.logsumexp(jnp.where(top, -jnp.inf, x), axis=-1,
                                keepdims=True)
  p = jnp.exp(x - lse)
  return jnp.where(top, x - lse_others,
                   x - lse - jnp.log1p(-jnp.where(top, 0., p)))


def _single_image(rois, roi_valid, cls_logits, deltas, img_shape,
                  scale_factor, *, score_thr, iou_threshold, max_per_img,
                  max_candidates, target_means, target_stds, block_size):
  """``get_detections`` for one image (all arrays without batch axis)."""
  r, c1 = cls_logits.shape
  c = c1 - 1
  scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[:, :c]
  log_odds = _log_odds(cls_logits)[:, :c]
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
  # Exact score ties: higher log-odds first (module docstring).
  tie_key = jnp.where(cand_valid, log_odds.reshape(r * c)[idx], -jnp.inf)
  _, _, order = jax.lax.sort((-top, -tie_key, jnp.arange(k)), num_keys=2)
  top, idx, cand_valid = top[order], idx[order], cand_valid[order]
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
