"""RPNHead and get_proposals against mmdetection 2.28.2 fixtures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import fixture_config, fixture_path, load_npz
from msrcnn_jax.modeling.rpn import RPNHead, get_proposals
from msrcnn_jax.ops.boxes import box_iou

LEVELS = range(2, 7)


def _rpn_variables(set_name):
  """The 6 rpn_head tensors of the fixture checkpoint as Flax params."""
  from msrcnn_jax.convert.mmdet import (  # pylint: disable=g-import-not-at-top
      load_torch_checkpoint, mmdet_key_to_path, torch_to_flax_layout)
  sd, _ = load_torch_checkpoint(fixture_path(set_name, 'checkpoint.pth'))
  params = {}
  for key, value in sd.items():
    if not key.startswith('rpn_head.'):
      continue
    path = mmdet_key_to_path(key, value.ndim)
    _, _, layer, leaf = path.split('/')  # params/rpn_head/<layer>/<leaf>
    params.setdefault(layer, {})[leaf] = jnp.asarray(
        torch_to_flax_layout(path, value))
  assert sorted(params) == ['rpn_cls', 'rpn_conv', 'rpn_reg']
  return {'params': params}


def _maps(d):
  cls = [d[f'rpn_cls_p{i}'].transpose(0, 2, 3, 1) for i in LEVELS]
  reg = [d[f'rpn_reg_p{i}'].transpose(0, 2, 3, 1) for i in LEVELS]
  return cls, reg


def _shapes(d):
  return (np.asarray(d['img_shape'][None, :2], np.int32),
          np.asarray(d['pad_shape'][None, :2], np.int32))


@functools.lru_cache(maxsize=None)
def _proposal_fn(**kw):
  return jax.jit(functools.partial(get_proposals, **kw))


def _run(cls, reg, img_shape, pad_shape, **kw):
  fn = _proposal_fn(**kw)
  out = fn([jnp.asarray(c) for c in cls], [jnp.asarray(r) for r in reg],
           jnp.asarray(img_shape), jnp.asarray(pad_shape))
  return [np.asarray(o) for o in out]


def _match_fraction(ref, boxes, scores, valid):
  """Fraction of mmdet proposals matched (IoU > 0.999, |ds| <= 1e-5)."""
  boxes, scores = boxes[valid], scores[valid]
  iou = np.asarray(box_iou(jnp.asarray(ref[:, :4]), jnp.asarray(boxes)))
  close = np.abs(ref[:, 4:5] - scores[None, :]) <= 1e-5
  return float(np.mean(np.any((iou > 0.999) & close, axis=1)))


def test_rpn_head_matches_mmdet(tiny_set):
  d = load_npz(tiny_set, 'chelsea')
  cfg = fixture_config(tiny_set)
  head = RPNHead(feat_channels=cfg.model.rpn_head.feat_channels)
  feats = [jnp.asarray(d[f'fpn_p{i}'].transpose(0, 2, 3, 1)) for i in LEVELS]
  cls, reg = jax.jit(head.apply)(_rpn_variables(tiny_set), feats)
  ref_cls, ref_reg = _maps(d)
  for ours, ref in zip(cls + reg, ref_cls + ref_reg):
    assert ours.shape == ref.shape
    rel = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel


def test_proposals_match_mmdet(tiny_set):
  d = load_npz(tiny_set, 'chelsea')
  cls, reg = _maps(d)
  boxes, scores, valid = _run(cls, reg, *_shapes(d))
  ref = d['proposals']
  assert boxes.shape == (1, 1000, 4)
  assert valid.sum() == len(ref)
  assert _match_fraction(ref, boxes[0], scores[0], valid[0]) >= 0.999
  # Sorted by descending score, like mmdetection's.
  np.testing.assert_allclose(scores[0], ref[:, 4], atol=1e-5)


def _into_bucket(maps, bucket_hw, fill):
  """Pads each level map to ceil(bucket / stride) with ``fill``."""
  out = []
  for m, s in zip(maps, (4, 8, 16, 32, 64)):
    h, w = -(-bucket_hw[0] // s), -(-bucket_hw[1] // s)
    out.append(np.pad(m, ((0, 0), (0, h - m.shape[1]), (0, w - m.shape[2]),
                          (0, 0)), constant_values=fill))
  return out


def test_bucket_padding_does_not_change_proposals(tiny_set):
  d = load_npz(tiny_set, 'chelsea')
  cls, reg = _maps(d)
  img_shape, pad_shape = _shapes(d)
  ref = _run(cls, reg, img_shape, pad_shape)
  # Large logits in the padding would win every top-k if not excluded.
  bcls = _into_bucket(cls, (384, 640), 10.)
  breg = _into_bucket(reg, (384, 640), 0.5)
  out = _run(bcls, breg, img_shape, pad_shape)
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, b)
  assert (out[0][..., 2] <= img_shape[0, 1]).all()


def test_batch_equals_single_images(tiny_set):
  d = load_npz(tiny_set, 'chelsea')
  cls, reg = _maps(d)
  img_shape, pad_shape = _shapes(d)
  # A second, smaller image: crop of permuted maps, pad 256x384.
  rng = np.random.default_rng(0)
  pad2 = np.array([[256, 384]], np.int32)
  img2 = np.array([[250, 371]], np.int32)
  cls2, reg2 = [], []
  for c, r, s in zip(cls, reg, (4, 8, 16, 32, 64)):
    h, w = -(-256 // s), -(-384 // s)
    cls2.append(rng.permutation(c[:, :h, :w].reshape(-1)).reshape(
        1, h, w, -1))
    reg2.append(r[:, :h, :w][:, ::-1, ::-1])
  single2 = _run(cls2, reg2, img2, pad2)
  single1 = _run(cls, reg, img_shape, pad_shape)
  bucket = (352, 512)
  bcls = [np.concatenate(p) for p in zip(_into_bucket(cls, bucket, 0.),
                                          _into_bucket(cls2, bucket, 3.))]
  breg = [np.concatenate(p) for p in zip(_into_bucket(reg, bucket, 0.),
                                          _into_bucket(reg2, bucket, 0.))]
  out = _run(bcls, breg, np.concatenate([img_shape, img2]),
             np.concatenate([pad_shape, pad2]))
  for i, single in enumerate((single1, single2)):
    for a, b in zip(out, single):
      np.testing.assert_array_equal(a[i], b[0])
  assert single2[2].sum() > 100


def test_train_mode_proposals_match_mmdet(tiny_set):
  """nms_pre 2000 (train_cfg.rpn_proposal) against ``rpn.proposals.0``.

  The train step ran on the same preprocessed input as chelsea.npz with
  frozen BN, so the RPN maps are the same.
  """
  d = load_npz(tiny_set, 'chelsea')
  with np.load(fixture_path(tiny_set, 'train.npz')) as t:
    np.testing.assert_array_equal(t['input'], d['input'])
    ref = t['rpn.proposals.0']
  cls, reg = _maps(d)
  boxes, scores, valid = _run(cls, reg, *_shapes(d), nms_pre=2000)
  assert valid.sum() == len(ref)
  assert _match_fraction(ref, boxes[0], scores[0], valid[0]) >= 0.999


def test_saturated_scores_are_ranked_by_logit():
  """Issue 9: logits 16.07, 16.27, 15.61 all have the float32 sigmoid
  0.99999988; the anchor with the highest logit must win NMS. ~3 s.

  One level, stride 16, one 16x16 anchor per cell on a 1x3 map; the deltas
  decode to A = [20, 20, 30, 30], B = [20, 20, 30, 34.2], C = [20, 20, 30,
  27.5] (IoU(A, B) = 0.704 and IoU(A, C) = 0.75 above 0.7, IoU(B, C) =
  0.528 below). Ranked by score, A (first index) would suppress B and C.
  """
  logits = np.array([16.07, 16.27, 15.61], np.float32)
  assert len(set(np.asarray(jax.nn.sigmoid(logits)).tolist())) == 1
  want = np.array([[20, 20, 30, 30], [20, 20, 30, 34.2], [20, 20, 30, 27.5]],
                  np.float64)
  anchors = np.array([[-8 + 16 * x, -8, 8 + 16 * x, 8] for x in range(3)],
                     np.float64)
  ctr = lambda b: ((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2)
  (wx, wy), (ax, ay) = ctr(want), ctr(anchors)
  deltas = np.stack([(wx - ax) / 16, (wy - ay) / 16,
                     np.log((want[:, 2] - want[:, 0]) / 16),
                     np.log((want[:, 3] - want[:, 1]) / 16)], -1)
  boxes, scores, valid = _run(
      [logits.reshape(1, 1, 3, 1)], [deltas.reshape(1, 1, 3, 4)],
      np.array([[64, 64]], np.int32), np.array([[64, 64]], np.int32),
      strides=(16,), scales=(1,), ratios=(1.0,), nms_pre=3, max_per_img=3,
      iou_threshold=0.7)
  assert valid[0].tolist() == [True, True, False]
  np.testing.assert_allclose(boxes[0, :2], want[[1, 2]], atol=1e-4)
  np.testing.assert_allclose(scores[0, :2], 0.99999988, atol=1e-7)
