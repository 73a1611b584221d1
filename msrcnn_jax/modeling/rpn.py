"""RPN head and proposal generation (spec §1.5, §2.2, §3.1, §5.11).

``RPNHead`` is mmdetection's ``RPNHead`` with one shared 3x3 conv: the same
weights run on every FPN level. ``get_proposals`` is
``RPNHead._get_bboxes_single`` + ``_bbox_post_process`` for a batch, with
static shapes: per level top ``nms_pre`` sigmoid scores, decode, clip, the
``w > 0 and h > 0`` filter, NMS per level (level-offset trick of
``batched_nms``) and the best ``max_per_img`` over all levels.

Anchors beyond an image's valid feature size ``ceil(pad_shape / stride)`` are
excluded, so the result does not depend on how far the batch is padded (a
single image in mmdetection has exactly that feature size).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrcnn_jax.ops import anchors as anchors_lib
from msrcnn_jax.ops import boxes as boxes_lib
from msrcnn_jax.ops import nms as nms_lib

# mmdetection's RPNHead init: normal_init(std=0.01), bias 0.
_RPN_INIT = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
  """Shared RPN conv + objectness + box deltas on every FPN level.

  Attributes:
    feat_channels: channels of ``rpn_conv`` (= FPN channels).
    num_anchors: anchors per location ``A`` (3).
    dtype: computation dtype (parameters stay float32).

  Parameters ``rpn_conv`` (3x3, C -> feat_channels, pad 1, ReLU), ``rpn_cls``
  (1x1 -> A), ``rpn_reg`` (1x1 -> 4A), as mmdetection's keys
  ``rpn_head.rpn_conv``/``rpn_cls``/``rpn_reg``.
  """
  feat_channels: int
  num_anchors: int = 3
  dtype: Any = jnp.float32

  def setup(self):
    kw = dict(kernel_init=_RPN_INIT, dtype=self.dtype,
              param_dtype=jnp.float32)
    self.rpn_conv = nn.Conv(self.feat_channels, (3, 3),
                            padding=((1, 1), (1, 1)), name='rpn_conv', **kw)
    self.rpn_cls = nn.Conv(self.num_anchors, (1, 1), padding='VALID',
                           name='rpn_cls', **kw)
    self.rpn_reg = nn.Conv(4 * self.num_anchors, (1, 1), padding='VALID',
                           name='rpn_reg', **kw)

  def __call__(self, feats: Sequence[jnp.ndarray]
               ) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
    """Runs the head on every level.

    Args:
      feats: ``[P2..P6]``, each ``(B, H_l, W_l, C)`` float32 NHWC.

    Returns:
      ``(cls, reg)``: lists of ``(B, H_l, W_l, A)`` objectness logits
      (channel a = anchor a) and ``(B, H_l, W_l, 4A)`` deltas (channel
      ``4a + k``, k in dx, dy, dw, dh).
    """
    cls, reg = [], []
    for x in feats:
      h = nn.relu(self.rpn_conv(x))
      cls.append(self.rpn_cls(h))
      reg.append(self.rpn_reg(h))
    return cls, reg


def _level_candidates(cls_l, reg_l, base, stride, vflags_l, k):
  """Top-``k`` valid anchors of one level for a batch.

  Args:
    cls_l: ``(B, H, W, A)`` logits.
    reg_l: ``(B, H, W, 4A)`` deltas.
    base: ``(A, 4)`` base anchors of the level.
    stride: level stride.
    vflags_l: ``(B, H*W*A)`` bool.
    k: static count (``<= H*W*A``).

  Returns:
    ``scores (B, k)`` descending, ``deltas (B, k, 4)``, ``anchors (B, k, 4)``,
    ``valid (B, k)``.
  """
  b = cls_l.shape[0]
  scores = jax.nn.sigmoid(cls_l.reshape(b, -1).astype(jnp.float32))
  deltas = reg_l.reshape(b, -1, 4).astype(jnp.float32)
  masked = jnp.where(vflags_l, scores, -jnp.inf)
  # Spec §2.2 step 2: a level with <= nms_pre anchors keeps all of them;
  # top_k with k = all is then just a permutation (NMS sorts anyway).
  top, idx = jax.lax.top_k(masked, k)
  valid = top > -jnp.inf
  deltas = jnp.take_along_axis(deltas, idx[..., None], axis=1)
  anchors = anchors_lib.anchors_at(idx, base, cls_l.shape[2], stride)
  return jnp.where(valid, top, 0.), deltas, anchors, valid


def get_proposals(cls_logits: Sequence[jnp.ndarray],
                  reg_deltas: Sequence[jnp.ndarray],
                  img_shape: jnp.ndarray,
                  pad_shape: jnp.ndarray,
                  strides: Sequence[int] = anchors_lib.DEFAULT_STRIDES,
                  scales: Sequence[float] = anchors_lib.DEFAULT_SCALES,
                  ratios: Sequence[float] = anchors_lib.DEFAULT_RATIOS,
                  nms_pre: int = 1000,
                  max_per_img: int = 1000,
                  iou_threshold: float = 0.7,
                  target_means: Sequence[float] = (0., 0., 0., 0.),
                  target_stds: Sequence[float] = (1., 1., 1., 1.),
                  block_size: int = nms_lib.DEFAULT_BLOCK_SIZE
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """RPN proposals of a batch (spec §2.2; training: spec §3.1, nms_pre 2000).

  Gradients are stopped (mmdetection detaches the RPN outputs).

  Args:
    cls_logits: per level ``(B, H_l, W_l, A)`` objectness logits.
    reg_deltas: per level ``(B, H_l, W_l, 4A)`` deltas.
    img_shape: ``(B, 2)`` int resized (h, w) before padding (clip limits).
    pad_shape: ``(B, 2)`` int (h, w) padded to /32; anchors outside
      ``ceil(pad_shape / stride)`` are ignored.
    strides, scales, ratios: anchor generator settings.
    nms_pre: per-level candidates kept before NMS (test 1000, train 2000).
    max_per_img: proposals returned per image ``N``.
    iou_threshold: NMS IoU threshold (0.7), suppress when IoU > it.
    target_means, target_stds: delta normalisation (RPN: 0 and 1).
    block_size: NMS block length.

  Returns:
    ``boxes (B, N, 4)`` float32 x1,y1,x2,y2 at test scale, sorted by
    descending score; ``scores (B, N)`` sigmoid scores; ``valid (B, N)`` bool.
    Padding rows are zero with ``valid`` False.
  """
  cls_logits = [jax.lax.stop_gradient(c) for c in cls_logits]
  reg_deltas = [jax.lax.stop_gradient(r) for r in reg_deltas]
  num_levels = len(cls_logits)
  num_anchors = len(scales) * len(ratios)
  img_shape = jnp.asarray(img_shape)
  pad_shape = jnp.asarray(pad_shape)
  feat_sizes = [tuple(c.shape[1:3]) for c in cls_logits]
  ks = [min(nms_pre, h * w * num_anchors) for h, w in feat_sizes]
  p = max(ks)

  s_all, d_all, a_all, v_all = [], [], [], []
  for lvl in range(num_levels):
    vflags = anchors_lib.level_valid_flags(
        feat_sizes[lvl], anchors_lib.valid_feature_size(pad_shape,
                                                        strides[lvl]),
        num_anchors)
    base = anchors_lib.base_anchors(strides[lvl], scales, ratios)
    s, d, a, v = _level_candidates(cls_logits[lvl], reg_deltas[lvl], base,
                                   strides[lvl], vflags, ks[lvl])
    pad = p - ks[lvl]
    s_all.append(jnp.pad(s, ((0, 0), (0, pad))))
    d_all.append(jnp.pad(d, ((0, 0), (0, pad), (0, 0))))
    a_all.append(jnp.pad(a, ((0, 0), (0, pad), (0, 0))))
    v_all.append(jnp.pad(v, ((0, 0), (0, pad))))
  scores = jnp.stack(s_all, 1)    # (B, L, P), per level descending
  deltas = jnp.stack(d_all, 1)    # (B, L, P, 4)
  anchors_c = jnp.stack(a_all, 1)  # (B, L, P, 4)
  valid = jnp.stack(v_all, 1)     # (B, L, P)

  boxes = boxes_lib.decode_deltas(anchors_c, deltas, target_means,
                                  target_stds,
                                  max_shape=img_shape[:, None, :])
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  valid = valid & (w > 0) & (h > 0)  # min_bbox_size=0 filter (spec §2.2.6)

  # batched_nms with level ids: offset = level * (max coordinate + 1), the
  # max over all surviving candidates of the image (spec §2.6). Offset
  # levels never overlap, so NMS runs per level (in parallel).
  max_coord = jnp.max(jnp.where(valid[..., None], boxes, -jnp.inf),
                      axis=(1, 2, 3))
  max_coord = jnp.where(jnp.any(valid, axis=(1, 2)), max_coord, 0.)
  lvl_ids = jnp.arange(num_levels, dtype=jnp.float32)
  offsets = lvl_ids[None, :] * (max_coord[:, None] + jnp.float32(1))
  boxes_off = boxes + offsets[:, :, None, None]

  k = min(max_per_img, p)
  nms_fn = jax.vmap(jax.vmap(
      lambda bx, v: nms_lib.nms_sorted(bx, v, iou_threshold, k, block_size)))
  keep, keep_valid = nms_fn(boxes_off, valid)  # (B, L, k)
  kept_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=2)
  kept_scores = jnp.take_along_axis(scores, keep, axis=2)

  # Merge levels: best max_per_img by score (ties: lower level first).
  b = boxes.shape[0]
  kept_boxes = kept_boxes.reshape(b, num_levels * k, 4)
  kept_scores = kept_scores.reshape(b, num_levels * k)
  keep_valid = keep_valid.reshape(b, num_levels * k)
  n_out = min(max_per_img, num_levels * k)
  top, idx = jax.lax.top_k(jnp.where(keep_valid, kept_scores, -jnp.inf),
                           n_out)
  out_valid = top > -jnp.inf
  out_boxes = jnp.take_along_axis(kept_boxes, idx[..., None], axis=1)
  out_boxes = jnp.where(out_valid[..., None], out_boxes, 0.)
  out_scores = jnp.where(out_valid, top, 0.)
  if n_out < max_per_img:
    pad = max_per_img - n_out
    out_boxes = jnp.pad(out_boxes, ((0, 0), (0, pad), (0, 0)))
    out_scores = jnp.pad(out_scores, ((0, 0), (0, pad)))
    out_valid = jnp.pad(out_valid, ((0, 0), (0, pad)))
  return out_boxes, out_scores, out_valid
