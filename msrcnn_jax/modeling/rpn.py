"""The RPN stage: head, proposals, anchor targets and loss (spec §1.5, §2.2,
§3.1, §5.11).

``RPN`` is the stage the detector calls (detectron2's proposal generator):
it runs ``RPNHead`` on the FPN levels and returns ``(proposals, losses)``;
its parameters are the head's, under mmdetection's ``rpn_head.*`` keys.
``RPNHead`` is mmdetection's ``RPNHead`` with one shared 3x3 conv: the same
weights run on every FPN level. ``rpn_targets`` is
``AnchorHead.get_targets`` for one image and ``rpn_loss`` is
``AnchorHead.loss``. ``get_proposals`` is
``RPNHead._get_bboxes_single`` + ``_bbox_post_process`` for a batch, with
static shapes: per level the top ``nms_pre`` anchors, decode, clip, the
``w > 0 and h > 0`` filter, NMS per level (level-offset trick of
``batched_nms``) and the best ``max_per_img`` over all levels.

Ranking is by objectness *logit*, not by its float32 sigmoid. The sigmoid is
monotonic, so the order is mmdetection's wherever the float32 scores differ;
above a logit of about 15.9 different logits round to the same score
(16.07, 16.27 and 15.61 all give 0.99999988), and there mmdetection's order
comes from unstable sorts (``scores.sort`` and mmcv's NMS) and is not
reproducible, while the logits still order the anchors (equal logits: lower
flat index, lower level first). A tie decides which of two overlapping
anchors survives NMS; on a full-size R-101 case the logit order matched
mmdetection where the score order did not.

Anchors beyond an image's valid feature size ``ceil(pad_shape / stride)`` are
excluded, so the result does not depend on how far the batch is padded (a
single image in mmdetection has exactly that feature size).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax.ops import anchors as anchors_lib
from msrcnn_jax.ops import boxes as boxes_lib
from msrcnn_jax.ops import matching
from msrcnn_jax.ops import nms as nms_lib
from msrcnn_jax.ops import padding
from msrcnn_jax.ops.losses import AVG_FACTOR_EPS, bce_with_logits

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
    ``logits (B, k)`` descending (0 on padding), ``deltas (B, k, 4)``,
    ``anchors (B, k, 4)``, ``valid (B, k)``.
  """
  b = cls_l.shape[0]
  logits = cls_l.reshape(b, -1).astype(jnp.float32)
  deltas = reg_l.reshape(b, -1, 4).astype(jnp.float32)
  # Ranked by logit, not by sigmoid score: the same order wherever the
  # float32 sigmoids differ, and a defined one where they tie (module
  # docstring).
  masked = jnp.where(vflags_l, logits, -jnp.inf)
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
    descending logit (hence score); ``scores (B, N)`` sigmoid scores;
    ``valid (B, N)`` bool.
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
        feat_sizes[lvl], padding.valid_size(pad_shape, strides[lvl]),
        num_anchors)
    base = anchors_lib.base_anchors(strides[lvl], scales, ratios)
    s, d, a, v = _level_candidates(cls_logits[lvl], reg_deltas[lvl], base,
                                   strides[lvl], vflags, ks[lvl])
    pad = p - ks[lvl]
    s_all.append(jnp.pad(s, ((0, 0), (0, pad))))
    d_all.append(jnp.pad(d, ((0, 0), (0, pad), (0, 0))))
    a_all.append(jnp.pad(a, ((0, 0), (0, pad), (0, 0))))
    v_all.append(jnp.pad(v, ((0, 0), (0, pad))))
  logits = jnp.stack(s_all, 1)    # (B, L, P), per level descending
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
  lvl_ids = jnp.arange(num_levels, dtype=jnp.int32)
  offsets = jax.vmap(nms_lib.batch_offsets, in_axes=(None, 0, 0))(
      lvl_ids, boxes, valid)                                 # (B, L)
  boxes_off = boxes + offsets[:, :, None, None]

  k = min(max_per_img, p)
  nms_fn = jax.vmap(jax.vmap(
      lambda bx, v: nms_lib.nms_sorted(bx, v, iou_threshold, k, block_size)))
  keep, keep_valid = nms_fn(boxes_off, valid)  # (B, L, k)
  kept_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=2)
  kept_logits = jnp.take_along_axis(logits, keep, axis=2)

  # Merge levels: best max_per_img by logit (equal logits: lower level
  # first).
  b = boxes.shape[0]
  kept_boxes = kept_boxes.reshape(b, num_levels * k, 4)
  kept_logits = kept_logits.reshape(b, num_levels * k)
  keep_valid = keep_valid.reshape(b, num_levels * k)
  n_out = min(max_per_img, num_levels * k)
  top, idx = jax.lax.top_k(jnp.where(keep_valid, kept_logits, -jnp.inf),
                           n_out)
  out_valid = top > -jnp.inf
  out_boxes = jnp.take_along_axis(kept_boxes, idx[..., None], axis=1)
  out_boxes = jnp.where(out_valid[..., None], out_boxes, 0.)
  out_scores = jnp.where(out_valid, jax.nn.sigmoid(top), 0.)
  if n_out < max_per_img:
    pad = max_per_img - n_out
    out_boxes = jnp.pad(out_boxes, ((0, 0), (0, pad), (0, 0)))
    out_scores = jnp.pad(out_scores, ((0, 0), (0, pad)))
    out_valid = jnp.pad(out_valid, ((0, 0), (0, pad)))
  return out_boxes, out_scores, out_valid


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
    gt_boxes: ``(G, 4)`` float32 (x1, y1, x2, y2) train-scale GT boxes;
      padded rows may hold anything.
    gt_valid: ``(G,)`` bool.
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
  ious = boxes_lib.box_iou(gt_boxes, anchors)
  assigned, max_overlaps = matching.max_iou_assign(
      ious, gt_valid, pos_iou_thr, neg_iou_thr, min_pos_iou,
      box_valid=valid_flags)
  indices, is_pos, valid = matching.sample_or_given(
      rng, sampled, assigned > 0, assigned == 0, num_samples, pos_fraction)
  drop = jnp.where(valid, indices, n)   # out of range -> dropped
  pos = jnp.zeros((n,), bool).at[drop].set(is_pos, mode='drop')
  sel = jnp.zeros((n,), bool).at[drop].set(True, mode='drop')
  gt_idx = jnp.clip(assigned - 1, 0, max(gt_boxes.shape[0] - 1, 0))
  if gt_boxes.shape[0] == 0:
    deltas = jnp.zeros((n, 4), jnp.float32)
  else:
    # Non-positives encode against themselves (finite; zeroed below).
    matched = jnp.where(pos[:, None], gt_boxes[gt_idx], anchors)
    deltas = boxes_lib.encode_deltas(anchors, matched, stds=target_stds)
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


def rpn_loss(cls_logits: Sequence[jnp.ndarray],
             reg_deltas: Sequence[jnp.ndarray],
             labels: jnp.ndarray,
             label_weights: jnp.ndarray,
             bbox_targets: jnp.ndarray,
             bbox_weights: jnp.ndarray) -> dict:
  """RPN loss (spec §3.1, ``AnchorHead.loss``): BCE-with-logits + L1.

  Both terms of every level are summed over the batch and divided by
  ``avg_factor = sum_b max(#pos_b, 1) + max(#neg_b, 1)`` (sampled anchors)
  plus mmdetection's eps, so a batch is normalised as mmdetection
  normalises the concatenation of its images.

  Args:
    cls_logits: per level ``(B, H_l, W_l, A)`` logits (NHWC; flattening gives
      mmdetection's (y, x, a) anchor order).
    reg_deltas: per level ``(B, H_l, W_l, 4 A)``.
    labels: ``(B, N)`` BCE targets (1 positive, 0 otherwise), N = sum of
      ``H_l W_l A``, levels concatenated.
    label_weights: ``(B, N)`` 1 on sampled anchors.
    bbox_targets: ``(B, N, 4)``; bbox_weights: ``(B, N, 4)`` 1 on positives.

  Returns:
    dict: ``loss_rpn_cls``, ``loss_rpn_bbox`` (scalars, sums over levels) and
    ``loss_rpn_cls_levels``, ``loss_rpn_bbox_levels`` ``(L,)``.
  """
  sampled = label_weights > 0
  pos = sampled & (labels > 0)
  num_pos = jnp.maximum(jnp.sum(pos, axis=-1), 1)
  num_neg = jnp.maximum(jnp.sum(sampled & ~pos, axis=-1), 1)
  avg = jnp.sum(num_pos + num_neg).astype(jnp.float32) + AVG_FACTOR_EPS
  cls_levels, box_levels = [], []
  start = 0
  for c, r in zip(cls_logits, reg_deltas):
    b = c.shape[0]
    c = c.reshape(b, -1).astype(jnp.float32)
    r = r.reshape(b, -1, 4).astype(jnp.float32)
    n = c.shape[1]
    sl = slice(start, start + n)
    start += n
    bce = bce_with_logits(c, labels[:, sl]) * label_weights[:, sl]
    l1 = jnp.abs(r - bbox_targets[:, sl]) * bbox_weights[:, sl]
    cls_levels.append(jnp.sum(bce) / avg)
    box_levels.append(jnp.sum(l1) / avg)
  cls_levels = jnp.stack(cls_levels)
  box_levels = jnp.stack(box_levels)
  return dict(loss_rpn_cls=jnp.sum(cls_levels),
              loss_rpn_bbox=jnp.sum(box_levels),
              loss_rpn_cls_levels=cls_levels,
              loss_rpn_bbox_levels=box_levels)


class RPN(nn.Module):
  """The RPN stage: proposals at test time, proposals + losses in training.

  Attributes:
    config: ``config.model.rpn_head`` (``feat_channels``, anchor
      ``anchor_strides``/``anchor_scales``/``anchor_ratios``,
      ``target_stds``).
    train_cfg: ``config.train`` (``rpn`` assigner/sampler,
      ``rpn_proposal``, ``loss_weights.rpn_cls``/``rpn_bbox``); needed for
      training only.
    test_cfg: ``config.test.rpn`` (``nms_pre``, ``max_per_img``,
      ``iou_threshold``); needed for inference only.
    dtype: compute dtype of the head (anchors, decoding, NMS and the loss
      always run in float32).

  Parameters are ``RPNHead``'s, directly under this module's scope
  (``params['rpn_head']['rpn_conv']``, as mmdetection's ``rpn_head.*``).
  """
  config: ml_collections.ConfigDict
  train_cfg: ml_collections.ConfigDict | None = None
  test_cfg: ml_collections.ConfigDict | None = None
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.head = RPNHead(
        feat_channels=c.feat_channels,
        num_anchors=len(c.anchor_ratios) * len(c.anchor_scales),
        dtype=self.dtype)
    nn.share_scope(self, self.head)

  def __call__(self, feats: Sequence[jnp.ndarray], img_shape: jnp.ndarray,
               pad_shape: jnp.ndarray, gt: dict | None = None,
               rng: jax.Array | None = None, sampled: dict | None = None
               ) -> tuple[dict, dict]:
    """Proposals of a batch and, given ground truth, the RPN losses.

    Args:
      feats: ``[P2..P6]``, each ``(B, H_l, W_l, C)``.
      img_shape: ``(B, 2)`` int32 resized (h, w) before padding.
      pad_shape: ``(B, 2)`` int32 (h, w) padded to /32.
      gt: training only: ``boxes (B, G, 4)`` float32 train-scale and
        ``valid (B, G)`` bool (other keys are ignored).
      rng: training only: PRNG key of the anchor sampler.
      sampled: training only, optional (parity tests): ``rpn`` = the
        sampler's ``(indices, is_pos, valid)`` batched, instead of drawing;
        ``proposals (B, N, 4)`` and ``proposal_valid (B, N)`` returned
        instead of the RPN's own.

    Returns:
      ``(proposals, losses)``: proposals ``boxes (B, N, 4)`` float32
      x1,y1,x2,y2 at test (train) scale sorted by descending score,
      ``scores (B, N)``, ``valid (B, N)``; ``N`` = ``max_per_img`` of
      ``test_cfg`` (inference) or ``train_cfg.rpn_proposal`` (training),
      padding rows zero. ``losses`` is empty at test time; in training
      ``loss_rpn_cls``, ``loss_rpn_bbox`` (weighted by
      ``train_cfg.loss_weights``) and ``num_rpn_pos`` (mean sampled
      positives per image).
    """
    cls, reg = self.head(feats)
    if gt is None:
      return self.proposals(cls, reg, img_shape, pad_shape, self.test_cfg), {}
    sampled = sampled or {}
    losses = self.losses(cls, reg, pad_shape, gt, rng, sampled.get('rpn'))
    if 'proposals' in sampled:
      proposals = dict(boxes=jnp.asarray(sampled['proposals']),
                       valid=jnp.asarray(sampled['proposal_valid']))
    else:
      proposals = self.proposals(cls, reg, img_shape, pad_shape,
                                 self.train_cfg.rpn_proposal)
    return proposals, losses

  def proposals(self, cls, reg, img_shape, pad_shape, cfg) -> dict:
    """``get_proposals`` with this stage's anchors and ``cfg``'s NMS."""
    c = self.config
    # Box decoding and NMS always run in float32 (bf16 cannot hold pixel
    # coordinates of a 1333-pixel image).
    boxes, scores, valid = get_proposals(
        [x.astype(jnp.float32) for x in cls],
        [x.astype(jnp.float32) for x in reg],
        img_shape=img_shape, pad_shape=pad_shape,
        strides=tuple(c.anchor_strides), scales=tuple(c.anchor_scales),
        ratios=tuple(c.anchor_ratios), nms_pre=cfg.nms_pre,
        max_per_img=cfg.max_per_img, iou_threshold=cfg.iou_threshold,
        target_stds=tuple(c.target_stds))
    return dict(boxes=boxes, scores=scores, valid=valid)

  def losses(self, cls, reg, pad_shape, gt, rng, sampled=None) -> dict:
    """Anchor targets of every image and the weighted RPN losses."""
    c, t = self.config, self.train_cfg
    strides = tuple(c.anchor_strides)
    feat_sizes = [tuple(x.shape[1:3]) for x in cls]
    anchors = jnp.concatenate(anchors_lib.multilevel_anchors(
        feat_sizes, strides, tuple(c.anchor_scales), tuple(c.anchor_ratios)))
    vflags = anchors_lib.valid_flags(feat_sizes, pad_shape, strides,
                                     cls[0].shape[-1])

    def one(vf, gb, gv, key, smp):
      return rpn_targets(
          anchors, vf, gb, gv, rng=key, sampled=smp,
          pos_iou_thr=t.rpn.pos_iou_thr, neg_iou_thr=t.rpn.neg_iou_thr,
          min_pos_iou=t.rpn.min_pos_iou, num_samples=t.rpn.num_samples,
          pos_fraction=t.rpn.pos_fraction,
          target_stds=tuple(c.target_stds))
    targets = jax.vmap(one)(vflags, gt['boxes'], gt['valid'],
                            jax.random.split(rng, gt['boxes'].shape[0]),
                            sampled)
    loss = rpn_loss(cls, reg, targets['labels'], targets['label_weights'],
                    targets['bbox_targets'], targets['bbox_weights'])
    lw = t.loss_weights
    return dict(
        loss_rpn_cls=lw.rpn_cls * loss['loss_rpn_cls'],
        loss_rpn_bbox=lw.rpn_bbox * loss['loss_rpn_bbox'],
        num_rpn_pos=jnp.mean(targets['num_pos'].astype(jnp.float32)))
