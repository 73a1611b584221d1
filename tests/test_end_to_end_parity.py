"""End to end against mmdetection 2.28.2: image file -> results.json.

For every fixture set: convert mmdetection's checkpoint, read the PNGs with
our loader, preprocess, run the jitted detector and the host postprocess, and
compare with what mmdetection wrote (``results.json`` and the npz stages):
- >= 99.9% of mmdetection's proposals reproduced (IoU > 0.999);
- every mmdetection detection matched by one of ours with the same label,
  box IoU >= 0.999, |d score| and |d mask_score| within the set's measured
  float32 bound (``conftest.PARITY_TOL``: 1e-4 to 5e-4) and pasted-mask
  IoU >= 0.99 (or at most one pixel different, for masks of a few dozen
  pixels), and as many detections as mmdetection;
- MaskIoU of all 80 classes within the set's bound (1e-4 to 4e-4
  relative).
Then the same images batched together in a larger bucket give the same
detections (padding to a bucket changes nothing).
"""

import functools

import jax
import numpy as np
from pycocotools import mask as mask_utils
import pytest

from conftest import (PARITY_TOL, SET_IMAGES, fixture_config, fixture_path,
                      load_npz, load_results)
from msrcnn_jax import postprocess
from msrcnn_jax.convert.mmdet import convert_checkpoint
from msrcnn_jax.data import image_io, transforms
from msrcnn_jax.inference import batch_by_bucket
from msrcnn_jax.modeling.detector import MaskScoringRCNN


@functools.lru_cache(maxsize=None)
def _model(set_name):
  cfg = fixture_config(set_name)
  variables, _ = convert_checkpoint(fixture_path(set_name, 'checkpoint.pth'),
                                    cfg)
  model = MaskScoringRCNN(cfg)
  fn = jax.jit(functools.partial(model.apply, return_intermediates=True))
  return cfg, variables, fn


def _items(cfg, images):
  items = []
  for i, name in enumerate(images):
    img = image_io.imread(fixture_path(f'{name}.png'))
    item = transforms.preprocess_test(img, cfg.data)
    item.update(image_id=i, file_name=f'{name}.png')
    items.append(item)
  return items


def _run(set_name, images, batch_size=1, buckets=None):
  """Records (in ``images`` order) and raw outputs per image name."""
  cfg, variables, fn = _model(set_name)
  data_cfg = cfg.data
  if buckets is not None:
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.buckets = buckets
  records, raw = {}, {}
  for batch in batch_by_bucket(_items(cfg, images), batch_size, data_cfg):
    out = jax.device_get(fn(variables, batch['image'], batch['img_shape'],
                            batch['pad_shape'], batch['scale_factor']))
    n = int(np.sum(batch['valid']))
    metas = [dict(image_id=int(batch['image_id'][i]),
                  file_name=batch['file_name'][i],
                  ori_shape=tuple(batch['ori_shape'][i])) for i in range(n)]
    for i, rec in enumerate(postprocess.outputs_to_records(out, metas)):
      name = images[rec['image_id']]
      records[name] = rec
      raw[name] = {k: np.asarray(v)[i] for k, v in out.items()
                   if k != 'features'}
  return records, raw


def _iou(a, b):
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-12)


def _assert_matches(ref_entries, rec, tol):
  """Every mmdetection entry of one image matched by one of our records.

  ``tol``: the set's ``conftest.PARITY_TOL`` entry (``score``,
  ``mask_score``).
  """
  assert len(rec['scores']) == len(ref_entries)
  ref_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in
                        (e['bbox'] for e in ref_entries)], np.float64)
  ious = _iou(ref_boxes, rec['boxes'].astype(np.float64))
  used = set()
  for i, e in enumerate(ref_entries):
    cands = [j for j in np.argsort(-ious[i])
             if ious[i, j] >= 0.999 and rec['labels'][j] == e['label']
             and abs(rec['scores'][j] - e['score']) <= tol['score']
             and j not in used]
    assert cands, f'mmdetection detection {i} ({e["label"]}, {e["bbox"]}, ' \
                  f'{e["score"]:.5f}) has no match'
    j = cands[0]
    used.add(j)
    assert abs(rec['mask_scores'][j] - e['mask_score']) <= tol['mask_score']
    ours, ref = rec['masks'][j], e['segmentation']
    m_iou = mask_utils.iou([ours], [ref], [0])[0, 0]
    inter = mask_utils.area(mask_utils.merge([ours, ref], intersect=True))
    differ = mask_utils.area(ours) + mask_utils.area(ref) - 2 * inter
    # Float32 logits agree to ~1e-4, so one pixel of a tiny mask (e.g. 25 px
    # at full scale) can sit on the 0.5 threshold: allow a 1-pixel change.
    assert m_iou >= 0.99 or differ <= 1, (i, m_iou, differ)


@pytest.mark.parametrize('set_name', sorted(SET_IMAGES))
def test_detections_match_mmdetection(set_name):
  images = SET_IMAGES[set_name]
  records, raw = _run(set_name, images)
  results = load_results(set_name)
  for name in images:
    ref = [e for e in results if e['image'] == f'{name}.png']
    _assert_matches(ref, records[name], PARITY_TOL[set_name])
    npz = load_npz(set_name, name)
    # Proposals: >= 99.9% of mmdetection's reproduced with IoU > 0.999.
    ours = raw[name]['proposals'][raw[name]['proposal_valid']]
    theirs = npz['proposals'][:, :4]
    best = _iou(theirs, ours).max(axis=1)
    assert np.mean(best > 0.999) >= 0.999, np.mean(best > 0.999)
    # MaskIoU head output of all classes, in mmdetection's detection order.
    k = len(npz['det_labels'])
    order = [int(np.argmax(_iou(npz['det_bboxes'][i:i + 1, :4],
                                raw[name]['boxes'])[0])) for i in range(k)]
    got = raw[name]['mask_iou_all'][order]
    ref = npz['mask_iou_pred']
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= PARITY_TOL[set_name]['mask_iou'], rel


def test_bucket_and_batch_do_not_change_detections():
  set_name = 'r50_caffe_tiny'
  images = SET_IMAGES[set_name]
  alone, _ = _run(set_name, images)
  # Both images in one batch, padded to a bucket larger than either needs.
  together, _ = _run(set_name, images, batch_size=2,
                     buckets=((416, 608),))
  for name in images:
    a, b = alone[name], together[name]
    assert len(a['scores']) == len(b['scores'])
    np.testing.assert_allclose(a['boxes'], b['boxes'], atol=1e-3)
    np.testing.assert_allclose(a['scores'], b['scores'], atol=1e-5)
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_allclose(a['mask_scores'], b['mask_scores'], atol=1e-5)
