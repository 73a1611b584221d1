"""Tests of msrcnn_jax.ops.anchors against mmdetection's anchors (train.npz)."""

import numpy as np

from conftest import fixture_path
from msrcnn_jax.ops import anchors as anchors_lib
from msrcnn_jax.ops import padding


def _train_npz(set_name):
  with np.load(fixture_path(set_name, 'train.npz')) as d:
    return {k: d[k] for k in ('rpn.anchors', 'rpn.valid_flags', 'pad_shape')}


def test_base_anchors_stride4():
  # Spec §1.5: w = 32 / sqrt(r), h = 32 * sqrt(r), centred on (0, 0).
  s = np.sqrt(2.0)
  expected = np.array([[-16 * s, -8 * s, 16 * s, 8 * s],
                       [-16, -16, 16, 16],
                       [-8 * s, -16 * s, 8 * s, 16 * s]])
  np.testing.assert_allclose(anchors_lib.base_anchors(4), expected,
                             rtol=1e-7)
  np.testing.assert_allclose(anchors_lib.base_anchors(4)[0],
                             [-22.627, -11.314, 22.627, 11.314], atol=1e-3)


def test_grid_order_yxa():
  a = anchors_lib.grid_anchors(anchors_lib.base_anchors(8), (2, 3), 8)
  assert a.shape == (2 * 3 * 3, 4)
  # Entry (y=1, x=2, a=1): square anchor of size 64 centred at (16, 8).
  np.testing.assert_array_equal(a[(1 * 3 + 2) * 3 + 1], [-16, -24, 48, 40])


def test_anchors_match_mmdet(tiny_set):
  d = _train_npz(tiny_set)
  fs = anchors_lib.feature_sizes(tuple(int(v) for v in d['pad_shape'][:2]))
  a = np.concatenate(anchors_lib.multilevel_anchors(fs))
  np.testing.assert_array_equal(a, d['rpn.anchors'])  # bit-exact
  v = np.asarray(anchors_lib.valid_flags(fs, d['pad_shape'][:2]))
  np.testing.assert_array_equal(v, d['rpn.valid_flags'])


def test_valid_flags_in_larger_bucket(tiny_set):
  """Bucket 384x640 holding a 320x512 image: only its ceil(pad/s) cells."""
  d = _train_npz(tiny_set)
  pad = d['pad_shape'][:2]
  fs = anchors_lib.feature_sizes((384, 640))
  a = np.concatenate(anchors_lib.multilevel_anchors(fs))
  v = np.asarray(anchors_lib.valid_flags(fs, np.stack([pad, [384, 640]])))
  assert v.shape == (2, a.shape[0])
  # The valid anchors of the small image are exactly mmdet's anchors.
  np.testing.assert_array_equal(a[v[0]], d['rpn.anchors'])
  assert v[1].all()
  # ceil: a 100x100 pad shape has 2x2 valid cells at stride 64.
  v6 = np.asarray(anchors_lib.level_valid_flags(
      (3, 3), padding.valid_size(np.array([100, 100]), 64), 1))
  assert v6.reshape(3, 3).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_anchors_at_equals_grid():
  base = anchors_lib.base_anchors(16)
  grid = anchors_lib.grid_anchors(base, (7, 11), 16)
  idx = np.array([[0, 5, 230], [229, 100, 17]])
  np.testing.assert_array_equal(
      np.asarray(anchors_lib.anchors_at(idx, base, 11, 16)), grid[idx])
