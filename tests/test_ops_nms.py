"""msrcnn_jax.ops.nms against hand-computed cases and a numpy oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrcnn_jax.ops import nms as nms_lib


def ref_nms(boxes, scores, thr, idxs=None):
  """Sequential greedy NMS as mmcv's CPU kernel (float32, offset trick)."""
  boxes = np.asarray(boxes, np.float32)
  scores = np.asarray(scores, np.float32)
  if idxs is not None:
    off = np.asarray(idxs).astype(np.float32) * (boxes.max() + np.float32(1))
    boxes = boxes + off[:, None]
  order = np.argsort(-scores, kind='stable')
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  sel = np.ones(len(order), bool)
  with np.errstate(invalid='ignore', divide='ignore'):
    for a in range(len(order)):
      if not sel[a]:
        continue
      i = order[a]
      for c in range(a + 1, len(order)):
        if not sel[c]:
          continue
        j = order[c]
        w = max(np.float32(0), min(boxes[i, 2], boxes[j, 2]) -
                max(boxes[i, 0], boxes[j, 0]))
        h = max(np.float32(0), min(boxes[i, 3], boxes[j, 3]) -
                max(boxes[i, 1], boxes[j, 1]))
        inter = np.float32(w * h)
        ovr = inter / np.float32(np.float32(area[i] + area[j]) - inter)
        if ovr > np.float32(thr):
          sel[c] = False
  return order[sel]


_nms_jit = jax.jit(nms_lib.nms, static_argnames=('max_output', 'block_size'))


def run_nms(boxes, scores, thr, max_output, valid=None, block_size=4):
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  if valid is None:
    valid = jnp.ones(scores.shape, bool)
  keep, kv = _nms_jit(boxes, scores, jnp.asarray(valid), jnp.float32(thr),
                      max_output=max_output, block_size=block_size)
  return np.asarray(keep), np.asarray(kv)


def test_strict_threshold():
  # IoU([0,0,4,1], [0,0,2,1]) = 2 / 4 = 0.5 exactly.
  boxes = [[0, 0, 4, 1], [0, 0, 2, 1]]
  keep, kv = run_nms(boxes, [0.9, 0.8], 0.5, 2)
  assert kv.tolist() == [True, True]  # IoU == thr: not suppressed
  assert keep.tolist() == [0, 1]
  keep, kv = run_nms(boxes, [0.9, 0.8], 0.49, 2)
  assert kv.tolist() == [True, False]
  assert keep.tolist() == [0, 0]


def test_chain_and_order():
  # a suppresses b (IoU 0.8); b would suppress c, but b is gone, so c stays.
  boxes = [[0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10], [50, 50, 60, 60]]
  scores = [0.5, 0.9, 0.3, 0.7]
  # order by score: 1 (b), 3 (d), 0 (a), 2 (c). IoU(b,a)=8/12>.5: a out;
  # IoU(b,c)=8/12: c out.
  keep, kv = run_nms(boxes, scores, 0.5, 4)
  assert keep[kv].tolist() == [1, 3]
  scores = [0.9, 0.5, 0.3, 0.7]
  # a (0), d (3), b (1) out by a, c (2): IoU(a,c)=6/14<.5 -> kept.
  keep, kv = run_nms(boxes, scores, 0.5, 4)
  assert keep[kv].tolist() == [0, 3, 2]
  # max_output truncates in score order.
  keep, kv = run_nms(boxes, scores, 0.5, 2)
  assert keep.tolist() == [0, 3] and kv.all()


def test_ties_keep_input_order():
  boxes = [[0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1]]
  keep, kv = run_nms(boxes, [0.5, 0.5, 0.5], 0.5, 3)
  assert keep[kv].tolist() == [0, 1]


def test_validity_padding():
  boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
  keep, kv = run_nms(boxes, [0.9, 0.95, 0.1], 0.5, 5,
                     valid=[True, False, True])
  # The invalid box (highest score) neither is kept nor suppresses.
  assert kv.tolist() == [True, True, False, False, False]
  assert keep.tolist() == [0, 2, 0, 0, 0]


def test_degenerate_boxes_never_suppress():
  boxes = [[1, 1, 1, 1], [1, 1, 1, 1]]
  keep, kv = run_nms(boxes, [0.9, 0.8], 0.5, 2)
  assert kv.all()


def test_offsets_separate_classes():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10]],
                   np.float32)
  scores = jnp.array([0.9, 0.8, 0.7])
  idxs = jnp.array([0, 1, 1])
  valid = jnp.ones(3, bool)
  off = np.asarray(nms_lib.offset_boxes(jnp.asarray(boxes), idxs, valid))
  # max coordinate 11 -> offset 12 per idx.
  np.testing.assert_array_equal(off[1], [12, 12, 22, 22])
  keep, kv = nms_lib.batched_nms(jnp.asarray(boxes), scores, idxs, valid,
                                 0.5, 3)
  assert np.asarray(keep)[np.asarray(kv)].tolist() == [0, 1]
  # The max is over valid boxes only.
  off = np.asarray(nms_lib.offset_boxes(
      jnp.asarray(boxes), idxs, jnp.array([True, True, False])))
  np.testing.assert_array_equal(off[2], [12, 11, 22, 21])


@functools.lru_cache(maxsize=None)
def _random_case(thr):
  rng = np.random.default_rng(0)
  n = 200
  xy = rng.uniform(0, 100, (n, 2))
  wh = rng.uniform(1, 40, (n, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  scores = rng.uniform(0, 1, n).astype(np.float32)
  return boxes, scores, ref_nms(boxes, scores, thr)


@pytest.mark.parametrize('block_size', [1, 7, 64])
def test_random_against_reference(block_size):
  for thr in (0.3, 0.7):
    boxes, scores, ref = _random_case(thr)
    n = len(scores)
    keep, kv = run_nms(boxes, scores, thr, n, block_size=block_size)
    assert keep[kv].tolist() == ref.tolist()
    # Early exit at max_output gives the prefix.
    keep, kv = run_nms(boxes, scores, thr, 10, block_size=block_size)
    assert keep.tolist() == ref[:10].tolist()


def test_random_batched_with_offsets_jit_vmap():
  rng = np.random.default_rng(1)
  b, n = 2, 200
  xy = rng.uniform(0, 50, (b, n, 2))
  wh = rng.uniform(1, 30, (b, n, 2))
  boxes = np.concatenate([xy, xy + wh], 2).astype(np.float32)
  # Quantised scores produce ties.
  scores = np.round(rng.uniform(0, 1, (b, n)), 2).astype(np.float32)
  idxs = rng.integers(0, 5, (b, n))
  valid = rng.uniform(size=(b, n)) < 0.8
  fn = jax.jit(jax.vmap(functools.partial(
      nms_lib.batched_nms, iou_threshold=0.5, max_output=n, block_size=32)))
  keep, kv = fn(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(idxs),
                jnp.asarray(valid))
  keep, kv = np.asarray(keep), np.asarray(kv)
  for i in range(b):
    sel = np.nonzero(valid[i])[0]
    ref = sel[ref_nms(boxes[i, sel], scores[i, sel], 0.5, idxs[i, sel])]
    assert keep[i][kv[i]].tolist() == ref.tolist()


# The tie case of issue 9 (17 boxes, so that a sort of more than 16 elements
# runs): A and B tie at 0.9, IoU(A, B) = 100 / 142 = 0.704 > 0.7,
# IoU(A, C) = 75 / 100 = 0.75 > 0.7, IoU(B, C) = 75 / 142 = 0.528 < 0.7, and
# 14 disjoint boxes. mmcv's CPU nms at 0.7 kept B and C (its unstable sort put
# B first); its order at exact ties is not a target.
TIE_BOXES = np.array([[0, 0, 10, 10], [0, 0, 10, 14.2], [0, 0, 10, 7.5]]
                     + [[100 + 20 * i, 0, 110 + 20 * i, 10]
                        for i in range(14)], np.float32)
TIE_SCORES = np.concatenate([[0.9, 0.9, 0.8], np.linspace(0.7, 0.1, 14)]
                            ).astype(np.float32)


def test_exact_ties_keep_the_lower_index_and_distinct_keys_decide():
  """~1 s."""
  valid = jnp.ones((17,), bool)
  run = jax.jit(functools.partial(nms_lib.nms, iou_threshold=0.7,
                                  max_output=17))
  keep, kv = run(jnp.asarray(TIE_BOXES), jnp.asarray(TIE_SCORES), valid)
  # A (index 0) comes first at the tie and suppresses B and C.
  assert np.asarray(keep)[np.asarray(kv)].tolist() == [0] + list(range(3, 17))
  # Ranked by keys without the tie (e.g. logits), B first: B and C survive.
  keys = TIE_SCORES.copy()
  keys[1] = np.nextafter(keys[1], np.float32(1))
  keep, kv = run(jnp.asarray(TIE_BOXES), jnp.asarray(keys), valid)
  assert np.asarray(keep)[np.asarray(kv)].tolist() == [1, 2] + list(
      range(3, 17))
