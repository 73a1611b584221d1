"""RoIAlign vs hand-computed values, an mmcv loop reference and fixtures."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_npz
from msrcnn_jax.ops.roi_align import map_roi_levels
from msrcnn_jax.ops.roi_align import multilevel_roi_align
from msrcnn_jax.ops.roi_align import roi_align


def _bilinear(feat, h, w, y, x):
  """mmcv's bilinear_interpolate (common_cuda_helper.hpp / roi_align.cpp)."""
  if y < -1. or y > h or x < -1. or x > w:
    return np.zeros(feat.shape[-1])
  y, x = max(y, 0.), max(x, 0.)
  yl, xl = int(y), int(x)
  if yl >= h - 1:
    yh = yl = h - 1
    y = float(yl)
  else:
    yh = yl + 1
  if xl >= w - 1:
    xh = xl = w - 1
    x = float(xl)
  else:
    xh = xl + 1
  ly, lx = y - yl, x - xl
  hy, hx = 1. - ly, 1. - lx
  return (hy * hx * feat[yl, xl] + hy * lx * feat[yl, xh]
          + ly * hx * feat[yh, xl] + ly * lx * feat[yh, xh])


def roi_align_loop(feat, boxes, scale, out, valid_hw=None, cap=None):
  """mmcv RoIAlign (aligned, avg, sampling_ratio=0) as a plain loop.

  ``cap``: emulate our documented static cap (a side whose adaptive grid
  exceeds ``cap`` is sampled with ``(cap + 2) // 2`` points per bin).
  """
  h, w = valid_hw if valid_hw is not None else feat.shape[:2]
  feat = feat.astype(np.float64)
  res = np.zeros((len(boxes), out, out, feat.shape[-1]))
  f32 = np.float32
  for n, box in enumerate(np.asarray(boxes, np.float32)):
    # float32 arithmetic as mmcv (the grid size ceil(bin) is sensitive).
    x1, y1, x2, y2 = (v * f32(scale) - f32(.5) for v in box)
    bh, bw = (y2 - y1) / f32(out), (x2 - x1) / f32(out)
    gh, gw = math.ceil(bh), math.ceil(bw)
    count = max(gh * gw, 1)
    if cap is not None:
      gh = gh if gh <= cap else (cap + 2) // 2
      gw = gw if gw <= cap else (cap + 2) // 2
      count = max(gh, 0) * max(gw, 0) or 1
    for ph in range(out):
      for pw in range(out):
        acc = 0.
        for iy in range(gh):
          y = y1 + f32(ph) * bh + f32(iy + .5) * bh / f32(gh)
          for ix in range(gw):
            x = x1 + f32(pw) * bw + f32(ix + .5) * bw / f32(gw)
            acc = acc + _bilinear(feat, h, w, float(y), float(x))
        res[n, ph, pw] = acc / count
  return res


def _ramp(h=6, w=6):
  y, x = np.mgrid[:h, :w].astype(np.float32)
  return (10. * y + x)[..., None]


def _run(feat, boxes, out, scale=1., max_samples=8, valid_hw=None):
  return np.asarray(roi_align(
      jnp.asarray(feat), jnp.asarray(boxes, jnp.float32), scale, out,
      max_samples, valid_hw=valid_hw))


def test_map_roi_levels():
  s = np.asarray([0., 50., 111.9, 112., 223.9, 224., 447., 448., 5000.])
  boxes = np.stack([np.zeros_like(s), np.zeros_like(s), s, s], -1)
  lvl = np.asarray(map_roi_levels(jnp.asarray(boxes, jnp.float32)))
  np.testing.assert_array_equal(lvl, [0, 0, 0, 1, 1, 2, 2, 3, 3])
  # Elongated: sqrt(400 * 40) = 126.5 -> level 1; negative area -> 0.
  lvl = map_roi_levels(jnp.asarray([[0., 0., 400., 40.], [5., 5., 0., 9.]]))
  np.testing.assert_array_equal(np.asarray(lvl), [1, 0])


def test_hand_computed_ramp():
  feat = _ramp()
  boxes = [
      # Inside: start 0.5, bin 1.5, 2 samples/side; a linear map gives the
      # value at the bin centres y, x in {1.25, 2.75}.
      [1., 1., 4., 4.],
      # Crossing the top-left border (out 1, 6x6 samples at -4..1): samples
      # < -1 are 0, -1 and 0 clamp to row 0: (30*1 + 3*1) / 36.
      [-4., -4., 2., 2.],
      # Crossing the bottom-right border (4 samples at 4..7): 4 -> row 4,
      # 5 and 6 -> row 5 (edge clamp, 6 <= H allowed), 7 > H -> 0.
      [4., 4., 8., 8.],
      # Zero size: grid 0 -> 0.
      [2., 2., 2., 2.],
      # Sub-pixel: one sample at the centre 1.75.
      [2., 2., 2.5, 2.5],
  ]
  got = _run(feat, boxes, 2)
  np.testing.assert_allclose(got[0, ..., 0], [[13.75, 15.25], [28.75, 30.25]],
                             rtol=1e-6)
  got = _run(feat, boxes, 1)[:, 0, 0, 0]
  np.testing.assert_allclose(got[1:], [33. / 36., 462. / 16., 0., 19.25],
                             rtol=1e-6)


def test_valid_hw_sets_boundary():
  # The same RoI on a 6x6 ramp and on that ramp padded to 9x10 with
  # valid_hw=(6, 6): identical (edge rules use the valid size).
  feat = _ramp()
  big = np.zeros((9, 10, 1), np.float32)
  big[:6, :6] = feat
  boxes = [[4., 4., 8., 8.], [-4., -4., 2., 2.], [0.5, 3., 7., 7.]]
  np.testing.assert_array_equal(_run(big, boxes, 3, valid_hw=(6, 6)),
                                _run(feat, boxes, 3))


def test_cap_approximation():
  # A 64-px-tall RoI with 2 bins needs 32 samples per bin side; with
  # max_samples=2 it uses (2 + 2) // 2 = 2 evenly spread points per bin.
  # On f = y^2 mmcv's bin 0 averages y = 0..31 -> 325.5; the cap samples
  # y = 7.5, 23.5 -> ((49 + 64) / 2 + (529 + 576) / 2) / 2 = 304.5 (on a
  # linear map the two agree).
  feat = (np.arange(64, dtype=np.float32) ** 2)[:, None, None]
  box = [[0., 0., 1., 64.]]
  exact = _run(feat, box, 2, max_samples=32)[0, :, 0, 0]
  capped = _run(feat, box, 2, max_samples=2)[0, :, 0, 0]
  np.testing.assert_allclose(exact[0], 325.5, rtol=1e-6)
  np.testing.assert_allclose(capped[0], 304.5, rtol=1e-6)
  np.testing.assert_allclose(
      capped, roi_align_loop(feat, box, 1., 2, cap=2)[0, :, 0, 0], rtol=1e-6)
  ramp = np.arange(64, dtype=np.float32)[:, None, None]
  np.testing.assert_allclose(_run(ramp, box, 2, max_samples=2),
                             _run(ramp, box, 2, max_samples=32), rtol=1e-6)


@pytest.mark.parametrize('out', [7, 14])
def test_matches_loop_reference(out):
  rng = np.random.default_rng(out)
  feat = rng.normal(size=(13, 17, 3)).astype(np.float32)
  ctr = rng.uniform(-10, 80, size=(40, 2))
  wh = np.exp(rng.uniform(np.log(.3), np.log(150), size=(40, 2)))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  boxes[0] = [8., 8., 8., 30.]          # zero width
  boxes[1] = [30., 10., 20., 40.]       # negative width
  max_samples = 3 if out == 7 else 1
  got = _run(feat, boxes, out, scale=.25, max_samples=max_samples,
             valid_hw=(12, 15))
  ref = roi_align_loop(feat, boxes, .25, out, valid_hw=(12, 15))
  side = np.abs(boxes[:, 2:] - boxes[:, :2]) * .25
  exact = np.ceil(side / out).max(1) <= max_samples
  assert 10 < exact.sum() < 40
  np.testing.assert_allclose(got[exact], ref[exact], atol=2e-5)
  capped = roi_align_loop(feat, boxes, .25, out, valid_hw=(12, 15),
                          cap=max_samples)
  np.testing.assert_allclose(got, capped, atol=2e-5)


def test_gradient_is_transpose():
  # RoIAlign is linear in the features: <g, A v> == <A^T g, v>.
  rng = np.random.default_rng(0)
  feat = jnp.asarray(rng.normal(size=(10, 12, 2)), jnp.float32)
  boxes = jnp.asarray([[3., 2., 30., 21.], [-5., 10., 14., 60.],
                       [20., 20., 20., 25.]], jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 7, 7, 2)), jnp.float32)
  fn = lambda f: roi_align(f, boxes, .25, 7, 2, valid_hw=(9, 12))
  grad = jax.grad(lambda f: jnp.sum(fn(f) * g))(feat)
  np.testing.assert_allclose(float(jnp.sum(grad * feat)),
                             float(jnp.sum(fn(feat) * g)), rtol=1e-5)
  assert float(jnp.abs(grad[9:]).max()) == 0.  # rows beyond valid_hw


def _fixture_feats(d, pad_to=None):
  feats = []
  for i in range(2, 6):
    f = d[f'fpn_p{i}'].transpose(0, 2, 3, 1)
    if pad_to is not None:
      s = 2 ** i
      big = np.zeros((1, pad_to[0] // s, pad_to[1] // s, f.shape[-1]),
                     np.float32)
      big[:, :f.shape[1], :f.shape[2]] = f
      f = big
    feats.append(jnp.asarray(f))
  return feats


def _rel(got, ref):
  return np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize('set_name', ['r50_caffe_tiny', 'x101_pytorch_tiny'])
def test_fixture_parity(set_name):
  d = load_npz(set_name, 'chelsea')
  feats = _fixture_feats(d)
  pad = jnp.asarray(d['pad_shape'][None, :2], jnp.int32)
  got = multilevel_roi_align(feats, jnp.asarray(d['proposals'][None, :50, :4]),
                             pad, output_size=7, max_samples=8)
  ref = d['bbox_roi_feats'].transpose(0, 2, 3, 1)
  assert _rel(np.asarray(got[0]), ref) < 1e-4
  mask_rois = d['mask_rois'][None, :20, 1:]
  got = multilevel_roi_align(feats, jnp.asarray(mask_rois), pad,
                             output_size=14, max_samples=8)
  ref = d['mask_roi_feats'].transpose(0, 2, 3, 1)
  assert _rel(np.asarray(got[0]), ref) < 1e-4


def test_bucket_padding_invariance():
  d = load_npz('r50_caffe_tiny', 'chelsea')
  pad = jnp.asarray(d['pad_shape'][None, :2], jnp.int32)
  # Proposals plus boxes reaching past the padded image (2nd image: same).
  boxes = np.concatenate([d['proposals'][:30, :4],
                          [[400., 250., 530., 340.], [-20., -9., 20., 9.]]])
  boxes = jnp.asarray(np.stack([boxes, boxes[::-1]]), jnp.float32)
  feats = [jnp.concatenate([f, f]) for f in _fixture_feats(d)]
  small = multilevel_roi_align(feats, boxes, jnp.concatenate([pad, pad]))
  feats_big = [jnp.concatenate([f, f])
               for f in _fixture_feats(d, pad_to=(384, 576))]
  big = multilevel_roi_align(feats_big, boxes, jnp.concatenate([pad, pad]))
  np.testing.assert_array_equal(np.asarray(big), np.asarray(small))
  np.testing.assert_array_equal(np.asarray(small[1]),
                                np.asarray(small[0])[::-1])


def test_indexed_maps_mask_targets():
  # Each RoI samples its own GT map (mask targets, spatial_scale 1, 28x28).
  from msrcnn_jax.ops.roi_align import roi_align_indexed
  rng = np.random.default_rng(3)
  maps = (rng.uniform(size=(3, 40, 50, 1)) > .5).astype(np.float32)
  boxes = np.asarray([[2., 3., 30., 37.], [0., 0., 50., 40.],
                      [10.5, 4.2, 47.9, 20.1], [5., 5., 5., 9.]], np.float32)
  index = np.asarray([2, 0, 1, 2], np.int32)
  got = np.asarray(roi_align_indexed(jnp.asarray(maps), jnp.asarray(index),
                                     jnp.asarray(boxes), 1., 28,
                                     max_samples=2))
  for i in range(4):
    ref = roi_align_loop(maps[index[i]], boxes[i:i + 1], 1., 28)
    np.testing.assert_allclose(got[i], ref[0], atol=1e-5)


@pytest.mark.parametrize('max_samples,out', [(1, 2), (2, 3), (3, 2)])
def test_stress_grid_edges(max_samples, out):
  # Many small RoIs, half with quarter-pixel sizes (integer bin sizes, where
  # ceil(bin) and the slot window are at their edges), against the loop
  # reference with the same cap.
  rng = np.random.default_rng(5)
  feat = rng.normal(size=(9, 11, 1)).astype(np.float32)
  n = 500
  ctr = rng.uniform(-5, 50, size=(n, 2))
  wh = rng.uniform(0, 30, size=(n, 2))
  wh = np.where(rng.uniform(size=(n, 2)) < .5, np.round(wh * 4) / 4, wh)
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  got = _run(feat, boxes, out, scale=.5, max_samples=max_samples,
             valid_hw=(8, 10))
  ref = roi_align_loop(feat, boxes, .5, out, valid_hw=(8, 10),
                       cap=max_samples)
  np.testing.assert_allclose(got, ref, atol=1e-5)
