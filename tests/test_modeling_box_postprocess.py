"""get_detections against mmdetection 2.28.2 det_bboxes / det_labels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SET_IMAGES, SETS, load_npz
from msrcnn_jax.modeling.heads.box_postprocess import get_detections
from msrcnn_jax.ops.boxes import box_iou

CASES = [(s, im) for s in SETS for im in SET_IMAGES[s]]


@functools.lru_cache(maxsize=None)
def _fn(**kw):
  return jax.jit(functools.partial(get_detections, **kw))


def _inputs(d):
  return dict(
      rois=d['proposals'][None, :, :4],
      roi_valid=np.ones((1, len(d['proposals'])), bool),
      cls_logits=d['bbox_cls_score'][None],
      deltas=d['bbox_pred'][None],
      img_shape=np.asarray(d['img_shape'][None, :2], np.int32),
      scale_factor=np.asarray(d['scale_factor'][None], np.float32))


def _run(inputs, **kw):
  out = _fn(**kw)(**{k: jnp.asarray(v) for k, v in inputs.items()})
  return {k: np.asarray(v) for k, v in out.items()}


def _assert_matches(d, boxes, scores, labels, valid):
  ref_b, ref_l = d['det_bboxes'], d['det_labels']
  assert valid.sum() == len(ref_b)
  assert valid[:len(ref_b)].all()  # valid rows first
  boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
  iou = np.asarray(box_iou(jnp.asarray(ref_b[:, :4]), jnp.asarray(boxes)))
  ok = ((iou >= 0.999) & (labels[None, :] == ref_l[:, None]) &
        (np.abs(scores[None, :] - ref_b[:, 4:5]) <= 1e-4))
  assert ok.any(axis=1).all(), np.nonzero(~ok.any(axis=1))[0]
  # Sorted by score like mmdetection's output.
  np.testing.assert_allclose(scores, ref_b[:, 4], atol=1e-4)


@pytest.mark.parametrize('set_name,image', CASES)
def test_detections_match_mmdet(set_name, image):
  d = load_npz(set_name, image)
  out = _run(_inputs(d))
  assert out['boxes'].shape == (1, 100, 4)
  assert out['labels'].dtype == np.int32
  _assert_matches(d, out['boxes'][0], out['scores'][0], out['labels'][0],
                  out['valid'][0])
  pad = ~out['valid'][0]
  assert (out['boxes'][0][pad] == 0).all()
  assert (out['scores'][0][pad] == 0).all()


def test_batch_with_invalid_rois():
  """Two images in one batch, padded with invalid high-scoring RoIs."""
  ds = [load_npz('r50_caffe_tiny', im) for im in SET_IMAGES['r50_caffe_tiny']]
  ins = [_inputs(d) for d in ds]
  extra = 24
  batch = {}
  for k in ins[0]:
    parts = []
    for x in ins:
      v = x[k]
      if v.ndim >= 2 and v.shape[1] == 1000:
        fill = 10. if k == 'cls_logits' else (False if k == 'roi_valid'
                                                else 5.)
        v = np.concatenate(
            [v, np.full((1, extra) + v.shape[2:], fill, v.dtype)], 1)
      parts.append(v)
    batch[k] = np.concatenate(parts)
  out = _run(batch)
  for i, d in enumerate(ds):
    _assert_matches(d, out['boxes'][i], out['scores'][i], out['labels'][i],
                    out['valid'][i])


def test_candidate_cap():
  """A cap below the number of passing candidates still gives the top."""
  d = load_npz('r50_caffe_tiny', 'chelsea')
  full = _run(_inputs(d))
  capped = _run(_inputs(d), max_candidates=300)
  n = capped['valid'][0].sum()
  assert n > 0
  # Whatever is kept from the capped list is a prefix of the full result.
  np.testing.assert_array_equal(capped['labels'][0][:n],
                                full['labels'][0][:n])
  np.testing.assert_array_equal(capped['boxes'][0][:n], full['boxes'][0][:n])


def test_saturated_scores_are_ranked_by_log_odds():
  """Softmax scores of logits (20, 0) and (25, 0) both round to 1.0 in
  float32; the second RoI is the more probable one and must win NMS (IoU
  0.704 > 0.5), although it comes later. ~2 s."""
  rois = np.array([[[0, 0, 10, 10], [0, 0, 10, 14.2]]], np.float32)
  out = _run(dict(rois=rois, roi_valid=np.ones((1, 2), bool),
                  cls_logits=np.array([[[20., 0.], [25., 0.]]], np.float32),
                  deltas=np.zeros((1, 2, 4), np.float32),
                  img_shape=np.array([[64, 64]], np.int32),
                  scale_factor=np.ones((1, 4), np.float32)),
             max_per_img=2)
  assert out['valid'][0].tolist() == [True, False]
  np.testing.assert_allclose(out['boxes'][0, 0], rois[0, 1], atol=1e-4)
  assert out['scores'][0, 0] == 1.0
