"""Box assignment and fixed-size sampling (spec §1.7, §3.1, §3.2).

``max_iou_assign`` reproduces mmdetection's ``MaxIoUAssigner`` and
``sample_fixed`` its ``RandomSampler`` with static shapes: the sampler always
returns exactly ``num`` slots plus a validity mask. ``pack_sampled`` turns
given index lists (e.g. mmdetection's own random choice, for parity tests)
into the same fixed-size form.

Assignment codes follow mmdetection's ``gt_inds``: ``-1`` ignore, ``0``
negative, ``i + 1`` matched to ground truth ``i``.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def max_iou_assign(ious: jnp.ndarray,
                   gt_valid: jnp.ndarray,
                   pos_iou_thr: float,
                   neg_iou_thr: float,
                   min_pos_iou: float,
                   match_low_quality: bool = True,
                   gt_max_assign_all: bool = True,
                   box_valid: jnp.ndarray | None = None,
                   ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """mmdetection's ``MaxIoUAssigner.assign_wrt_overlaps`` (spec §3.1).

  1. everything starts as ignore (-1);
  2. max IoU over GTs in ``[0, neg_iou_thr)`` -> negative (0);
  3. max IoU ``>= pos_iou_thr`` -> the argmax GT (first one on ties);
  4. low-quality matches: for every GT whose best IoU is ``>= min_pos_iou``,
     every box whose IoU with it equals that best IoU (``gt_max_assign_all``;
     otherwise only the first such box) is assigned to it, overwriting step 3
     in GT order (a later GT wins);
  5. with no valid GT every valid box is negative, with max overlap 0.

  Invalid GT rows and invalid boxes (``box_valid``, e.g. anchors outside the
  per-image valid grid, padded proposals) take no part: their IoUs are
  replaced by -1, so they never set a maximum, never match, and invalid
  boxes come out as ignore (-1) with max overlap 0.

  Args:
    ious: ``(G, N)`` float IoU of GT ``i`` with box ``j`` (``ops.boxes.box_iou``
      with eps 1e-6). Rows of invalid GTs may hold anything.
    gt_valid: ``(G,)`` bool.
    pos_iou_thr, neg_iou_thr, min_pos_iou: the assigner thresholds.
    match_low_quality: step 4 on/off.
    gt_max_assign_all: step 4 assigns all boxes tying the GT's best IoU.
    box_valid: optional ``(N,)`` bool; default all valid.

  Returns:
    ``assigned_gt`` ``(N,)`` int32 in {-1, 0, 1..G} and ``max_overlaps``
    ``(N,)`` float32 (the max IoU over valid GTs; 0 for invalid boxes and
    when there is no valid GT).
  """
  num_gt, num_box = ious.shape
  if box_valid is None:
    box_valid = jnp.ones((num_box,), bool)
  ok = gt_valid[:, None] & box_valid[None, :]
  ious = jnp.where(ok, ious, -1.0)
  any_gt = jnp.any(gt_valid)
  if num_gt == 0:
    max_overlaps = jnp.zeros((num_box,), ious.dtype)
    argmax = jnp.zeros((num_box,), jnp.int32)
  else:
    max_overlaps = jnp.max(ious, axis=0)
    argmax = jnp.argmax(ious, axis=0).astype(jnp.int32)
  assigned = jnp.full((num_box,), -1, jnp.int32)
  assigned = jnp.where((max_overlaps >= 0) & (max_overlaps < neg_iou_thr), 0,
                       assigned)
  assigned = jnp.where(max_overlaps >= pos_iou_thr, argmax + 1, assigned)
  if match_low_quality and num_gt > 0:
    gt_max = jnp.max(ious, axis=1)                      # (G,)
    gt_ok = gt_valid & (gt_max >= min_pos_iou)
    if gt_max_assign_all:
      match = gt_ok[:, None] & (ious == gt_max[:, None])
    else:
      first = jnp.argmax(ious, axis=1)
      match = gt_ok[:, None] & (jnp.arange(num_box)[None, :] == first[:, None])
    # The loop over GTs overwrites, so the last matching GT wins.
    last = num_gt - 1 - jnp.argmax(match[::-1], axis=0).astype(jnp.int32)
    assigned = jnp.where(jnp.any(match, axis=0), last + 1, assigned)
  # Zero GTs: all negative, overlaps 0 (spec §3.1 step 5).
  assigned = jnp.where(any_gt, assigned, 0)
  max_overlaps = jnp.where(any_gt, max_overlaps, 0.0)
  assigned = jnp.where(box_valid, assigned, -1)
  max_overlaps = jnp.where(box_valid, max_overlaps, 0.0)
  return assigned, max_overlaps.astype(jnp.float32)


def _random_rank(key: jax.Array, mask: jnp.ndarray) -> jnp.ndarray:
  """A uniformly random rank 0..count-1 for each True entry of ``mask``.

  False entries get ranks >= count. ``(N,)`` int32.
  """
  n = mask.shape[0]
  u = jax.random.uniform(key, (n,))
  order = jnp.argsort(jnp.where(mask, u, 2.0))
  return jnp.zeros((n,), jnp.int32).at[order].set(
      jnp.arange(n, dtype=jnp.int32))


def _pack(pos_sel: jnp.ndarray, neg_sel: jnp.ndarray, num: int):
  """Selected entries as ``num`` slots: positives then negatives, each sorted
  by index (mmdetection applies ``unique()`` to both), then padding."""
  n = pos_sel.shape[0]
  m = max(n, num)
  if m > n:
    pad = jnp.zeros((m - n,), bool)
    pos_sel = jnp.concatenate([pos_sel, pad])
    neg_sel = jnp.concatenate([neg_sel, pad])
  idx = jnp.arange(m, dtype=jnp.int32)
  key = jnp.where(pos_sel, idx, jnp.where(neg_sel, m + idx, 2 * m + idx))
  # The ``num`` smallest keys in ascending order.
  neg_key, order = jax.lax.top_k(-key, num)
  picked = -neg_key
  valid = picked < 2 * m
  is_pos = picked < m
  indices = jnp.where(valid, order.astype(jnp.int32), 0)
  return indices, is_pos, valid


def sample_fixed(rng: jax.Array, pos_mask: jnp.ndarray, neg_mask: jnp.ndarray,
                 num: int, pos_fraction: float
                 ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """RandomSampler with a static output size (spec §3.1, §3.2).

  Up to ``int(num * pos_fraction)`` positives are drawn uniformly at random
  without replacement; negatives, drawn the same way, fill up to ``num``
  (``neg_pos_ub=-1``). The draw is deterministic for a given key.

  Args:
    rng: a PRNG key.
    pos_mask: ``(N,)`` bool candidates for positives.
    neg_mask: ``(N,)`` bool candidates for negatives (disjoint from
      ``pos_mask``; invalid entries must be False in both).
    num: total number of slots.
    pos_fraction: maximum positive share.

  Returns:
    ``indices`` ``(num,)`` int32 into the N entries: the chosen positives in
    ascending index order, then the chosen negatives ascending, then padding
    (index 0); ``is_pos`` ``(num,)`` bool; ``valid`` ``(num,)`` bool (False
    on padding, i.e. when fewer than ``num`` candidates exist).
  """
  neg_mask = neg_mask & ~pos_mask
  k_pos, k_neg = jax.random.split(rng)
  num_pos_max = int(num * pos_fraction)
  pos_sel = pos_mask & (_random_rank(k_pos, pos_mask) < num_pos_max)
  num_neg = num - jnp.sum(pos_sel)
  neg_sel = neg_mask & (_random_rank(k_neg, neg_mask) < num_neg)
  return _pack(pos_sel, neg_sel, num)


def sample_or_given(rng: jax.Array | None, sampled, pos_mask: jnp.ndarray,
                    neg_mask: jnp.ndarray, num: int, pos_fraction: float
                    ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """``sample_fixed``, or given samples in its form (parity tests).

  Args:
    rng: PRNG key of the draw (ignored when ``sampled`` is given).
    sampled: ``None`` or ``(indices, is_pos, valid)`` of ``num`` slots, e.g.
      from ``pack_sampled``.
    pos_mask, neg_mask, num, pos_fraction: as ``sample_fixed``.

  Returns:
    ``(indices, is_pos, valid)`` as ``sample_fixed``; given samples come
    back with ``is_pos & valid``.

  Raises:
    ValueError: neither ``rng`` nor ``sampled`` is given.
  """
  if sampled is not None:
    indices, is_pos, valid = (jnp.asarray(a) for a in sampled)
    return indices.astype(jnp.int32), is_pos & valid, valid
  if rng is None:
    raise ValueError('pass either rng or sampled')
  return sample_fixed(rng, pos_mask, neg_mask, num, pos_fraction)


def pack_sampled(pos_inds, neg_inds, num: int
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Given sampled index lists (host side) in ``sample_fixed``'s fixed form.

  Used to feed mmdetection's own random choice (``*.sample.pos_inds`` /
  ``neg_inds``) to the target functions in parity tests. The order of the
  lists is kept (mmdetection's is already ascending).

  Args:
    pos_inds: 1-D ints, the sampled positives.
    neg_inds: 1-D ints, the sampled negatives.
    num: number of slots (>= total).

  Returns:
    numpy ``indices (num,) int32``, ``is_pos (num,) bool``,
    ``valid (num,) bool``, padded with index 0 / False.
  """
  pos_inds = np.asarray(pos_inds, np.int32).reshape(-1)
  neg_inds = np.asarray(neg_inds, np.int32).reshape(-1)
  k = pos_inds.size + neg_inds.size
  if k > num:
    raise ValueError(f'{k} sampled indices do not fit in {num} slots')
  indices = np.zeros((num,), np.int32)
  indices[:k] = np.concatenate([pos_inds, neg_inds])
  is_pos = np.zeros((num,), bool)
  is_pos[:pos_inds.size] = True
  valid = np.zeros((num,), bool)
  valid[:k] = True
  return indices, is_pos, valid
