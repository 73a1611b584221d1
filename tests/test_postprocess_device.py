"""Masks pasted on the device and RLE from run boundaries (issue 11).

References: mmdetection 2.28.2's results.json (its ``_do_paste_mask`` +
``encode_mask_results``), torch ``grid_sample`` (what ``_do_paste_mask``
calls) and pycocotools ``encode``.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pycocotools.mask as mask_util
import pytest

from conftest import SET_IMAGES, SETS, load_npz, load_results
import test_ops_masks
from msrcnn_jax import inference
from msrcnn_jax import postprocess
from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.ops import masks as masks_lib


def _device_outputs(logits, boxes, labels):
  k = len(logits)
  return dict(boxes=boxes[None], paste_boxes=boxes[None],
              scores=np.linspace(1, .1, k, dtype=np.float32)[None],
              labels=np.asarray(labels, np.int32)[None],
              valid=np.ones((1, k), bool),
              mask_logits=np.asarray(logits, np.float32)[None],
              mask_iou=np.ones((1, k), np.float32),
              mask_scores=np.ones((1, k), np.float32))


_PASTE = jax.jit(postprocess.paste_on_device,
                 static_argnames=('canvas_hw', 'mask_thr'))
_ENCODE = jax.jit(postprocess.encode_on_device)


def _on_device(outputs, hw, canvas):
  """paste_on_device + encode_on_device of one image, as the Predictor."""
  ori = jnp.asarray([hw], jnp.int32)
  masks = _PASTE({k: jnp.asarray(v) for k, v in outputs.items()}, ori,
                 canvas_hw=canvas)
  return dict(jax.device_get(_ENCODE(masks, ori)),
              canvas_hw=np.asarray(canvas))


def _records(outputs, hw, on_device, canvas=None):
  host = {k: np.asarray(v) for k, v in outputs.items()}
  if on_device:
    canvas = canvas or postprocess.canvas_size([hw])
    host.update(_on_device(outputs, hw, canvas))
    del host['mask_logits']
  return postprocess.outputs_to_records(
      host, [dict(image_id=0, file_name='x', ori_shape=hw)])[0]


@pytest.mark.parametrize('set_name,image',
                         [(s, i) for s in SETS for i in SET_IMAGES[s]])
def test_device_paste_reproduces_mmdetection(set_name, image):
  """Logits -> RLE on the device path gives mmdetection's RLE strings."""
  d = load_npz(set_name, image)
  hw = tuple(int(v) for v in d['ori_shape'][:2])
  # One canvas for every fixture image (one compilation).
  rec = _records(_device_outputs(d['mask_pred'], test_ops_masks._mmdet_boxes(d),
                                 d['det_labels']), hw, on_device=True,
                 canvas=(512, 768))
  ref = [e for e in load_results(set_name)
         if e['image'].startswith(image + '.')]
  det = d['det_bboxes'][:, :4].astype(np.float64)
  xywh = np.concatenate([det[:, :2], det[:, 2:] - det[:, :2]], 1)
  assert len(rec['masks']) == len(ref) == 100
  for mask, box, label in zip(rec['masks'], xywh, d['det_labels']):
    hits = [e for e in ref if e['label'] == int(label)
            and np.allclose(e['bbox'], box, atol=1e-3)]
    assert mask in [e['segmentation'] for e in hits]


def _torch_paste(mask, box, h0, w0):
  """mmdetection's _do_paste_mask(skip_empty=True) for one mask, full size,
  thresholded at 0.5 (the region paste of tests/test_ops_masks.py)."""
  val, (yl, yh, xl, xh) = test_ops_masks._torch_paste(mask, box, h0, w0)  # pylint: disable=protected-access
  out = np.zeros((h0, w0), bool)
  out[yl:yh, xl:xh] = val >= 0.5
  return out


def test_paste_jnp_matches_torch_on_a_larger_canvas():
  """Pixel-exact with grid_sample, boxes inside, across and outside the
  image, tiny and zero-size; nothing set beyond the image."""
  rng = np.random.default_rng(1)
  h0, w0, k = 100, 120, 40
  probs = rng.uniform(size=(k, 28, 28)).astype(np.float32)
  ctr = rng.uniform(-20, 130, (k, 2))
  wh = np.exp(rng.uniform(np.log(.3), np.log(150), (k, 2)))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  boxes[0] = [10, 10, 10, 30]                 # zero width
  boxes[1] = [50.2, 60.7, 51.1, 61.3]         # sub-pixel
  boxes[2] = [-5, -5, 200, 200]               # covers the image
  got = np.asarray(jax.jit(masks_lib.paste_masks_jnp, static_argnums=2)(
      jnp.asarray(probs), jnp.asarray(boxes), (128, 192), 0.5,
      jnp.asarray([h0, w0])))
  assert not got[:, h0:].any() and not got[:, :, w0:].any()
  for i in range(k):
    np.testing.assert_array_equal(got[i, :h0, :w0],
                                  _torch_paste(probs[i], boxes[i], h0, w0))
  assert got.sum() > 5000


def test_rle_from_transitions_equals_pycocotools():
  """Runs across column ends, first/last pixels, full and empty masks."""
  rng = np.random.default_rng(2)
  h0, w0, hc, wc = 13, 11, 24, 16
  masks = rng.uniform(size=(8, h0, w0)) < .5
  masks[0] = False
  masks[1] = True
  masks[2] = False
  masks[2, -1, 3] = masks[2, 0, 4] = True       # a run across a column end
  masks[3] = False
  masks[3, 0, 0] = masks[3, -1, -1] = True
  masks[4] = False
  masks[4, :, 5:7] = True                       # full columns
  canvas = np.zeros((8, hc, wc), bool)
  canvas[:, :h0, :w0] = masks
  hw = jnp.asarray([h0, w0])
  packed = masks_lib.rle_transitions_jnp(jnp.asarray(canvas), hw)
  idx, val, count = (np.asarray(a) for a in
                     masks_lib.compact_bytes(packed, 8 * wc * hc // 8))
  assert count < len(idx) and not val[count:].any()
  got = masks_lib.rles_from_transitions(idx[:count], val[:count], (wc, hc),
                                        (h0, w0), len(masks))
  for g, m in zip(got, masks):
    ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    assert g == {'size': [h0, w0], 'counts': ref['counts'].decode()}
  # A short capacity reports the true count.
  _, _, count4 = masks_lib.compact_bytes(packed, 4)
  assert int(count4) == count


def test_overflowing_image_is_pasted_on_the_host():
  """rle_count > capacity: the record falls back to the logits."""
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (5, 28, 28)).astype(np.float32)
  boxes = np.array([[2, 3, 40, 30], [0, 0, 64, 48], [10, 5, 12, 9],
                    [30, 20, 63, 47], [5, 25, 20, 47]], np.float32)
  outputs = _device_outputs(logits, boxes, [0, 1, 2, 3, 4])
  hw = (48, 64)
  host = _records(outputs, hw, on_device=False)
  both = dict(outputs, **_on_device(outputs, hw, postprocess.canvas_size(
      [hw])))
  assert postprocess.outputs_to_records(both, [dict(ori_shape=hw)])[0][
      'masks'] == host['masks']
  both['rle_count'] = np.array([both['rle_index'].shape[1] + 1])
  both['rle_index'] = both['rle_index'] * 0   # garbage: must not be read
  assert postprocess.outputs_to_records(both, [dict(ori_shape=hw)])[0][
      'masks'] == host['masks']
  assert sum(mask_util.area(host['masks'])) > 500


def test_region_rle_equals_pycocotools():
  """Host path: RLE from a box region's columns, regions at every edge."""
  rng = np.random.default_rng(4)
  h0, w0 = 17, 23
  cases = [((0, 0), (17, 23)), ((0, 0), (5, 4)), ((12, 19), (5, 4)),
           ((3, 20), (14, 3)), ((0, 7), (17, 1)), ((4, 5), (0, 0))]
  bounds = []
  masks = []
  for (y0, x0), (h, w) in cases:
    region = rng.uniform(size=(h, w)) < .6
    if h and w:
      region[0, 0] = region[-1, -1] = True
    full = np.zeros((h0, w0), bool)
    full[y0:y0 + h, x0:x0 + w] = region
    masks.append(full)
    bounds.append(masks_lib.region_boundaries(region, (y0, x0), (h0, w0)))
  got = masks_lib.rles_from_boundaries(bounds, (h0, w0))
  assert got == [masks_lib.encode_rle(m) for m in masks]


class _StubPredictor(inference.Predictor):
  """The Predictor with the detector replaced by fixed outputs."""

  outputs = None

  def detect(self, batch):
    return {k: jnp.asarray(v[:len(batch['image'])])
            for k, v in self.outputs.items()}


def test_predictor_device_paste_and_workers_give_the_host_records():
  """Same records, in order, pasted on the device or the host, made in a
  worker process or inline; padding entries dropped."""
  rng = np.random.default_rng(5)
  k, n = 7, 5
  ctr = rng.uniform(0, 60, (n, k, 2))
  wh = rng.uniform(2, 40, (n, k, 2))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], -1).astype(np.float32)
  valid = np.arange(k)[None] < np.array([7, 3, 0, 5, 7])[:, None]
  outputs = dict(boxes=boxes * valid[..., None], paste_boxes=boxes,
                 scores=rng.uniform(size=(n, k)).astype(np.float32),
                 labels=rng.integers(0, 3, (n, k)).astype(np.int32),
                 valid=valid,
                 mask_logits=rng.normal(0, 3, (n, k, 28, 28)).astype(
                     np.float32),
                 mask_iou=rng.uniform(size=(n, k)).astype(np.float32),
                 mask_scores=rng.uniform(size=(n, k)).astype(np.float32))
  ori = np.array([[50, 70], [64, 48], [30, 30], [72, 72], [41, 66]])
  batches = []
  for s in range(0, n, 2):
    m = min(2, n - s)
    batches.append(dict(
        image=np.zeros((2, 8, 8, 3), np.float32),
        img_shape=np.zeros((2, 2), np.int32),
        pad_shape=np.zeros((2, 2), np.int32),
        scale_factor=np.ones((2, 4), np.float32),
        ori_shape=np.concatenate([ori[s:s + m], ori[s:s + 1]])[:2],
        image_id=np.arange(s, s + 2), valid=np.arange(2) < m))
  results = {}
  for paste, workers in (('host', 0), ('device', 0), ('device', 1)):
    cfg = ms_rcnn_config()
    cfg.test.mask_paste = paste
    cfg.test.postprocess_workers = workers
    pred = _StubPredictor(cfg, {})
    recs = []
    for s, batch in zip(range(0, n, 2), batches):
      pred.outputs = {key: np.concatenate([v[s:s + 2], v[s:s + 1]])[:2]
                      for key, v in outputs.items()}
      recs += list(pred.predict_batches([batch]))
    pred.close()
    assert [r['image_id'] for r in recs] == list(range(n))
    results[paste, workers] = recs
  ref = results['host', 0]
  for key in (('device', 0), ('device', 1)):
    for a, b in zip(ref, results[key]):
      assert a['masks'] == b['masks']
      np.testing.assert_array_equal(a['boxes'], b['boxes'])
  assert [len(r['masks']) for r in ref] == [7, 3, 0, 5, 7]
  assert sum(mask_util.area(ref[0]['masks'])) > 100


def test_broken_worker_pool_falls_back_to_this_process():
  """A worker that dies (e.g. spawn failing on a guard-less script) costs
  nothing but the pool: the records are made in the calling process."""
  cfg = ms_rcnn_config()
  cfg.test.mask_paste = 'host'
  cfg.test.postprocess_workers = 1
  pred = _StubPredictor(cfg, {})
  rng = np.random.default_rng(6)
  pred.outputs = dict(
      boxes=np.array([[[2., 2., 20., 30.]]], np.float32),
      paste_boxes=np.array([[[2., 2., 20., 30.]]], np.float32),
      scores=np.ones((1, 1), np.float32), labels=np.zeros((1, 1), np.int32),
      valid=np.ones((1, 1), bool),
      mask_logits=rng.normal(2, 1, (1, 1, 28, 28)).astype(np.float32),
      mask_iou=np.ones((1, 1), np.float32),
      mask_scores=np.ones((1, 1), np.float32))
  batch = dict(image=np.zeros((1, 8, 8, 3), np.float32),
               img_shape=np.zeros((1, 2), np.int32),
               pad_shape=np.zeros((1, 2), np.int32),
               scale_factor=np.ones((1, 4), np.float32),
               ori_shape=np.array([[40, 30]]), image_id=np.array([0]))
  pool = pred._worker_pool()  # pylint: disable=protected-access
  assert pool.submit(int, '7').result() == 7      # workers started
  for pid in list(pool._processes):  # pylint: disable=protected-access
    os.kill(pid, signal.SIGKILL)
  recs = list(pred.predict_batches([batch, batch]))
  assert pred.postprocess_workers == 0 and len(recs) == 2
  assert recs[0]['masks'] == recs[1]['masks']
  assert mask_util.area(recs[0]['masks'])[0] > 300
