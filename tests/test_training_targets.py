"""Assigner, sampler and training targets against mmdetection 2.28.2.

The fixture's ``train.npz`` holds one training step of mmdetection on the
first image with 5 synthetic ellipse instances: its anchors, GT, assignments,
random samples and targets. Feeding mmdetection's sampled indices makes every
target deterministic, so they must agree exactly (up to float rounding).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from msrcnn_jax.modeling.heads.mask_head import mask_targets
from msrcnn_jax.modeling.heads.maskiou_head import maskiou_targets
from msrcnn_jax.modeling.roi_heads import rcnn_targets
from msrcnn_jax.modeling.rpn import rpn_targets
from msrcnn_jax.ops import matching

_rpn_targets = jax.jit(rpn_targets)
_rcnn_targets = jax.jit(rcnn_targets)
_mask_targets = jax.jit(mask_targets,
                        static_argnames=('mask_size', 'max_samples'))
_maskiou_targets = jax.jit(maskiou_targets)


def _train(set_name):
  with np.load(fixture_path(set_name, 'train.npz')) as d:
    return {k: d[k] for k in d.files}


def _gt(d):
  g = d['gt_bboxes'].shape[0]
  return (jnp.asarray(d['gt_bboxes']), jnp.asarray(d['gt_labels'], jnp.int32),
          jnp.ones((g,), bool))


def _full_frames(d):
  g, h, w = d['gt_masks'].shape
  return np.tile(np.array([0, 0, w, h], np.float32), (g, 1)), (h, w)


def _box_crops(full, boxes, size):
  """GT bitmaps as box-aligned ``size x size`` crops, sampled at cell centres
  (what rasterising a polygon into the crop does)."""
  out = []
  for m, b in zip(full, boxes):
    cw = (b[2] - b[0]) / size
    ch = (b[3] - b[1]) / size
    xs = np.floor(b[0] + (np.arange(size) + 0.5) * cw).astype(int)
    ys = np.floor(b[1] + (np.arange(size) + 0.5) * ch).astype(int)
    xs = np.clip(xs, 0, m.shape[1] - 1)
    ys = np.clip(ys, 0, m.shape[0] - 1)
    out.append(m[ys][:, xs])
  return np.stack(out)


def _pos_rois(d):
  rois = d['rcnn.sample.pos_bboxes']
  gt = d['rcnn.sample.pos_assigned_gt_inds'].astype(np.int32)
  logits = d['mask.pred'][np.arange(len(gt)), d['gt_labels'][gt]]
  return rois, gt, logits


# ---------------------------------------------------------------- assigner


def test_max_iou_assign_hand_cases():
  ious = jnp.array([[0.4, 0.1, 0.2, 0.8, 0.0],
                    [0.5, 0.2, 0.5, 0.8, 0.1],
                    [0.6, 0.0, 0.6, 0.0, 0.0]], jnp.float32)
  valid = jnp.ones((3,), bool)
  args = (0.7, 0.3, 0.3)
  a, mo = matching.max_iou_assign(ious, valid, *args)
  # box 3: positive for GT 0 (argmax), then low-quality GT 1 overwrites;
  # GT 2's best 0.6 is shared by boxes 0 and 2 (gt_max_assign_all).
  np.testing.assert_array_equal(a, [3, 0, 3, 2, 0])
  np.testing.assert_allclose(mo, [0.6, 0.2, 0.6, 0.8, 0.1])
  a, _ = matching.max_iou_assign(ious, valid, *args, gt_max_assign_all=False)
  np.testing.assert_array_equal(a, [3, 0, -1, 2, 0])
  a, _ = matching.max_iou_assign(ious, valid, *args, match_low_quality=False)
  np.testing.assert_array_equal(a, [-1, 0, -1, 1, 0])
  # An invalid GT row takes no part.
  a, mo = matching.max_iou_assign(ious, jnp.array([True, True, False]), *args)
  np.testing.assert_array_equal(a, [-1, 0, -1, 2, 0])
  np.testing.assert_allclose(mo, [0.5, 0.2, 0.5, 0.8, 0.1])
  # An invalid box is ignored and sets no GT maximum.
  box_valid = jnp.array([True, True, True, False, True])
  a, mo = matching.max_iou_assign(ious, valid, *args, box_valid=box_valid)
  np.testing.assert_array_equal(a, [3, 0, 3, -1, 0])
  np.testing.assert_allclose(mo, [0.6, 0.2, 0.6, 0.0, 0.1])
  # No valid GT: every valid box negative, overlaps 0.
  a, mo = matching.max_iou_assign(ious, jnp.zeros((3,), bool), *args,
                                  box_valid=box_valid)
  np.testing.assert_array_equal(a, [0, 0, 0, -1, 0])
  np.testing.assert_array_equal(mo, np.zeros(5))


# ----------------------------------------------------------------- sampler


def test_sample_fixed_counts_fraction_and_determinism():
  n = 2000
  key = jax.random.PRNGKey(3)
  kinds = jax.random.randint(jax.random.PRNGKey(0), (n,), 0, 3)  # 2: invalid
  sample = jax.jit(matching.sample_fixed, static_argnums=(3, 4))
  for num_pos_avail, num, frac in ((500, 256, 0.5), (10, 256, 0.5)):
    pos = (kinds == 0) & (jnp.arange(n) < num_pos_avail * 3)
    neg = kinds == 1
    idx, is_pos, valid = sample(key, pos, neg, num, frac)
    idx, is_pos, valid = map(np.asarray, (idx, is_pos, valid))
    n_pos = min(int(np.sum(pos)), int(num * frac))
    assert is_pos.sum() == n_pos
    assert valid.all() and valid.sum() == num
    chosen = idx[valid]
    assert len(np.unique(chosen)) == num                 # no duplicates
    np.testing.assert_array_equal(np.asarray(pos)[chosen], is_pos[valid])
    assert np.asarray(neg)[chosen[~is_pos[valid]]].all()  # never invalid
    # [positives ascending; negatives ascending] as mmdetection's unique().
    assert is_pos[:n_pos].all()
    assert (np.diff(idx[:n_pos]) > 0).all()
    assert (np.diff(idx[n_pos:]) > 0).all()
    again = sample(key, pos, neg, num, frac)[0]
    np.testing.assert_array_equal(again, idx)
    other = sample(jax.random.PRNGKey(4), pos, neg, num, frac)[0]
    assert not np.array_equal(other, idx)


def test_sample_fixed_pads_when_short_and_is_uniform():
  pos = jnp.zeros((40,), bool).at[jnp.arange(0, 20)].set(True)
  neg = jnp.zeros((40,), bool).at[jnp.arange(30, 35)].set(True)
  idx, is_pos, valid = jax.jit(matching.sample_fixed, static_argnums=(3, 4))(
      jax.random.PRNGKey(0), pos, neg, 64, 0.25)
  assert valid.sum() == 16 + 5 and is_pos.sum() == 16
  np.testing.assert_array_equal(np.asarray(idx)[16:21], np.arange(30, 35))
  assert not np.asarray(valid)[21:].any()
  # Every positive equally likely: 5 of 20 drawn, 400 keys.
  keys = jax.random.split(jax.random.PRNGKey(1), 400)
  draw = jax.jit(jax.vmap(
      lambda k: matching.sample_fixed(k, pos, neg, 20, 0.25)))
  idx, is_pos, _ = draw(keys)
  counts = np.bincount(np.asarray(idx)[np.asarray(is_pos)], minlength=40)
  assert counts[20:].sum() == 0
  freq = counts[:20] / 400.0
  assert np.abs(freq - 0.25).max() < 0.1


def test_pack_sampled():
  idx, is_pos, valid = matching.pack_sampled([4, 7], [1, 2, 9], 8)
  np.testing.assert_array_equal(idx, [4, 7, 1, 2, 9, 0, 0, 0])
  np.testing.assert_array_equal(is_pos, [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 0, 0, 0])


# --------------------------------------------------------- RPN / R-CNN parity


def test_rpn_targets_match_mmdet(tiny_set):
  d = _train(tiny_set)
  gt_boxes, _, gt_valid = _gt(d)
  sampled = matching.pack_sampled(d['rpn.sample.pos_inds'],
                                  d['rpn.sample.neg_inds'], 256)
  r = _rpn_targets(jnp.asarray(d['rpn.anchors']),
                   jnp.asarray(d['rpn.valid_flags']), gt_boxes, gt_valid,
                   sampled=sampled)
  np.testing.assert_array_equal(r['assigned_gt'], d['rpn.assign.gt_inds'])
  np.testing.assert_allclose(r['max_overlaps'], d['rpn.assign.max_overlaps'],
                             rtol=0, atol=1e-6)
  # mmdetection's label 0 = foreground, 1 = background -> BCE target.
  np.testing.assert_array_equal(r['labels'], d['rpn.targets.0'] == 0)
  np.testing.assert_array_equal(r['label_weights'], d['rpn.targets.1'])
  np.testing.assert_allclose(r['bbox_targets'], d['rpn.targets.2'],
                             rtol=0, atol=1e-5)
  np.testing.assert_array_equal(r['bbox_weights'], d['rpn.targets.3'])
  assert int(r['num_pos']) == len(d['rpn.sample.pos_inds'])
  assert int(r['num_neg']) == len(d['rpn.sample.neg_inds'])


def test_rpn_targets_random_sampling(tiny_set):
  d = _train(tiny_set)
  gt_boxes, _, gt_valid = _gt(d)
  valid_flags = jnp.asarray(d['rpn.valid_flags']).at[:1000].set(False)
  r = _rpn_targets(jnp.asarray(d['rpn.anchors']), valid_flags, gt_boxes,
                   gt_valid, rng=jax.random.PRNGKey(0))
  n_pos_avail = int(np.sum(d['rpn.assign.gt_inds'] > 0))
  assert int(r['num_pos']) == min(n_pos_avail, 128)
  assert int(r['num_pos']) + int(r['num_neg']) == 256
  w = np.asarray(r['label_weights']) > 0
  assert not w[:1000].any()
  assigned = np.asarray(r['assigned_gt'])
  assert (assigned[w & (np.asarray(r['labels']) > 0)] > 0).all()
  assert (assigned[w & (np.asarray(r['labels']) == 0)] == 0).all()


def test_rcnn_targets_match_mmdet(tiny_set):
  d = _train(tiny_set)
  gt_boxes, gt_labels, gt_valid = _gt(d)
  num_gt = gt_boxes.shape[0]
  proposals = jnp.asarray(d['rpn.proposals.0'][:, :4])
  sampled = matching.pack_sampled(d['rcnn.sample.pos_inds'],
                                  d['rcnn.sample.neg_inds'], 512)
  r = _rcnn_targets(proposals, jnp.ones((1000,), bool), gt_boxes, gt_labels,
                    gt_valid, sampled=sampled)
  np.testing.assert_array_equal(r['assigned_gt'][num_gt:],
                                d['rcnn.assign.gt_inds'])
  np.testing.assert_array_equal(r['assigned_gt'][:num_gt],
                                np.arange(1, num_gt + 1))
  np.testing.assert_allclose(r['max_overlaps'][num_gt:],
                             d['rcnn.assign.max_overlaps'], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(r['labels'], d['rcnn.targets.0'])
  np.testing.assert_array_equal(r['label_weights'], d['rcnn.targets.1'])
  np.testing.assert_allclose(r['bbox_targets'], d['rcnn.targets.2'],
                             rtol=0, atol=1e-5)
  np.testing.assert_array_equal(r['bbox_weights'], d['rcnn.targets.3'])
  num_pos = len(d['rcnn.sample.pos_inds'])
  np.testing.assert_array_equal(r['rois'][:num_pos],
                                d['rcnn.sample.pos_bboxes'])
  np.testing.assert_array_equal(r['rois'][num_pos:],
                                d['rcnn.sample.neg_bboxes'])
  np.testing.assert_array_equal(r['pos_assigned_gt'][:num_pos],
                                d['rcnn.sample.pos_assigned_gt_inds'])


def test_rcnn_targets_random_sampling_with_padding(tiny_set):
  d = _train(tiny_set)
  gt_boxes, gt_labels, _ = _gt(d)
  gt_valid = jnp.array([True, True, True, False, True])
  proposal_valid = jnp.arange(1000) < 600
  r = _rcnn_targets(jnp.asarray(d['rpn.proposals.0'][:, :4]), proposal_valid,
                    gt_boxes, gt_labels, gt_valid, rng=jax.random.PRNGKey(1))
  idx = np.asarray(r['sampled_inds'])[np.asarray(r['roi_valid'])]
  assert np.asarray(r['roi_valid']).sum() == 512
  assert 3 not in idx and (idx < 5 + 600).all()
  is_pos = np.asarray(r['is_pos'])
  # The valid GT boxes are positives; positives fill the first slots.
  assert {0, 1, 2, 4} <= set(np.asarray(r['sampled_inds'])[is_pos].tolist())
  k = is_pos.sum()
  assert k <= 128 and is_pos[:k].all() and not is_pos[k:].any()
  labels = np.asarray(r['labels'])
  assert (labels[~is_pos] == 80).all()
  np.testing.assert_array_equal(
      labels[is_pos], d['gt_labels'][np.asarray(r['pos_assigned_gt'])[is_pos]])


# --------------------------------------------------------- mask / MaskIoU


def test_mask_and_maskiou_targets_exact_mode(tiny_set):
  """Full-resolution frame (the padded image): bit-exact with mmdetection.

  One padding row (valid False) is appended; it must come out 0.
  """
  d = _train(tiny_set)
  frames, pad_hw = _full_frames(d)
  rois, gt, logits = _pos_rois(d)
  p = len(gt)
  clipped = np.clip(rois, 0, [pad_hw[1], pad_hw[0]] * 2)
  side = max(np.max(clipped[:, 2] - clipped[:, 0]),
             np.max(clipped[:, 3] - clipped[:, 1]))
  max_samples = int(math.ceil(side / 28))   # exact: no RoI above the cap
  rois = np.concatenate([rois, rois[:1]])
  gt = np.concatenate([gt, gt[:1]])
  logits = np.concatenate([logits, logits[:1]])
  valid = np.arange(p + 1) < p
  mt = _mask_targets(rois, gt, d['gt_masks'], frames, pad_hw, valid=valid,
                     max_samples=max_samples)
  np.testing.assert_array_equal(mt[:p], d['mask.targets'])
  assert not np.asarray(mt[p]).any()
  it = _maskiou_targets(rois, gt, logits, mt, d['gt_masks'], frames, pad_hw,
                        valid=valid)
  np.testing.assert_allclose(it[:p], d['maskiou.targets'], rtol=0, atol=1e-5)
  assert float(it[p]) == 0.0


def test_mask_targets_box_crops_approximation(tiny_set):
  """112 x 112 box crops (the default storage): measured disagreement.

  Measured (mmdetection 2.28.2 fixtures): r50_caffe_tiny 0.60 % of target
  pixels differ, max |MaskIoU target diff| 9.6e-4; x101_pytorch_tiny 0.27 %,
  1.7e-3. The differences are boundary pixels whose bilinear value is near
  0.5; the asserted bounds leave a margin.
  """
  d = _train(tiny_set)
  _, pad_hw = _full_frames(d)
  rois, gt, logits = _pos_rois(d)
  frames = d['gt_bboxes']
  crops = _box_crops(d['gt_masks'], frames, 112)
  mt = np.asarray(_mask_targets(rois, gt, crops, frames, pad_hw))
  disagree = np.mean(mt != d['mask.targets'])
  assert disagree < 0.015, disagree
  it = _maskiou_targets(rois, gt, logits, mt, crops, frames, pad_hw)
  np.testing.assert_allclose(it, d['maskiou.targets'], rtol=0, atol=5e-3)
