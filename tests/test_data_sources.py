"""Synthetic, COCO-directory and TFDS sources; pipeline determinism/sharding."""

import json
import os

import cv2
import numpy as np
import pytest

from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.data import coco, image_io, pipeline, synthetic
from msrcnn_jax.ops.masks import encode_rle

SYN = dict(num_train=6, num_val=3, image_size=(64, 64), max_objects=4,
           num_classes=3)


def _small_cfg():
  cfg = ms_rcnn_config()
  d = cfg.data
  d.img_scale = (128, 64)
  d.buckets = ((64, 128), (128, 64), (64, 64))
  d.max_instances = 4
  d.gt_mask_crop_size = 8
  d.num_workers = 2
  d.prefetch = 1
  d.synthetic = dict(SYN)
  return cfg


# -------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_masks_match_boxes():
  a = synthetic.SyntheticDataset('train', SYN, seed=3)
  b = synthetic.SyntheticDataset('train', SYN, seed=3)
  c = synthetic.SyntheticDataset('train', SYN, seed=4)
  assert len(a) == 6 and len(synthetic.SyntheticDataset('val', SYN, 3)) == 3
  assert [x['name'] for x in a.categories] == ['rectangle', 'ellipse',
                                               'triangle']
  for i in range(len(a)):
    ra, rb = a[i], b[i]
    for k in ('image', 'masks', 'boxes', 'labels'):
      np.testing.assert_array_equal(ra[k], rb[k])
    assert ra['image'].shape == (64, 64, 3) and ra['image'].dtype == np.uint8
    masks = ra['masks']
    assert masks.shape[1:] == (64, 64) and len(masks) == len(ra['boxes'])
    assert masks.sum(0).max() <= 1  # visible parts never overlap
    assert ((0 <= ra['labels']) & (ra['labels'] < 3)).all()
    for m, box in zip(masks, ra['boxes']):
      ys, xs = np.nonzero(m)
      np.testing.assert_array_equal(
          box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


# ------------------------------------------------------------ COCO / TFDS
@pytest.fixture(scope='module')
def tiny_coco(tmp_path_factory):
  """4 synthetic images + a crowd annotation, a w<1 box and an empty image.

  Category ids are renumbered to 7, 3, 5 (listed unsorted) so that labels
  must follow the sorted ids (3 -> 0, 5 -> 1, 7 -> 2).
  """
  root = str(tmp_path_factory.mktemp('coco'))
  ann_file = synthetic.write_coco(root, 'train', 4, SYN, seed=1)
  with open(ann_file) as f:
    d = json.load(f)
  new_id = {1: 7, 2: 3, 3: 5}
  d['categories'] = [dict(c, id=new_id[c['id']]) for c in d['categories']]
  for a in d['annotations']:
    a['category_id'] = new_id[a['category_id']]
  crowd = np.zeros((64, 64), np.uint8)
  crowd[2:20, 30:60] = 1
  n = len(d['annotations'])
  d['annotations'].append(dict(
      id=n + 1, image_id=1, category_id=3, bbox=[30, 2, 30, 18], area=540.0,
      iscrowd=1, segmentation=encode_rle(crowd)))
  d['annotations'].append(dict(
      id=n + 2, image_id=2, category_id=5, bbox=[10, 10, 0.5, 8], area=4.0,
      iscrowd=0, segmentation=[[10, 10, 10.5, 10, 10.5, 18, 10, 18]]))
  # A polygon annotation (decoded via frPyObjects + merge).
  d['annotations'].append(dict(
      id=n + 3, image_id=3, category_id=7, bbox=[4, 4, 20, 10], area=200.0,
      iscrowd=0, segmentation=[[4, 4, 24, 4, 24, 14, 4, 14]]))
  d['images'].append(dict(id=5, file_name='empty.png', height=48, width=80))
  cv2.imwrite(os.path.join(root, 'train', 'empty.png'),
              np.full((48, 80, 3), 127, np.uint8))
  with open(ann_file, 'w') as f:
    json.dump(d, f)
  return root, d


def test_coco_source_filters_like_mmdetection(tiny_coco):
  root, d = tiny_coco
  train = coco.CocoSource(root, 'train', train=True)
  evals = coco.CocoSource(root, 'train', train=False)
  assert train.cat_ids == (3, 5, 7)
  assert train.class_names == ('ellipse', 'triangle', 'rectangle')
  assert [r['image_id'] for r in train] == [1, 2, 3, 4]  # empty skipped
  assert [r['image_id'] for r in evals] == [1, 2, 3, 4, 5]
  assert len(evals[4]['boxes']) == 0 and evals[4]['height'] == 48
  label_of = {3: 0, 5: 1, 7: 2}
  for r in train:
    anns = [a for a in d['annotations'] if a['image_id'] == r['image_id']
            and not a['iscrowd'] and a['bbox'][2] >= 1]
    assert len(r['boxes']) == len(anns)  # crowd and w < 1 excluded
    np.testing.assert_array_equal(
        r['labels'], [label_of[a['category_id']] for a in anns])
    np.testing.assert_array_equal(
        r['boxes'], np.float32([[a['bbox'][0], a['bbox'][1],
                                 a['bbox'][0] + a['bbox'][2],
                                 a['bbox'][1] + a['bbox'][3]] for a in anns]))
    masks = coco.decode_masks(r)
    assert masks.shape == (len(anns), 64, 64) and masks.dtype == np.uint8
    assert image_io.load_record_image(r).shape == (64, 64, 3)
  # Records match the generator's exact masks (RLE round trip).
  gen = synthetic.SyntheticDataset('train', dict(SYN, num_train=4), seed=1)
  np.testing.assert_array_equal(coco.decode_masks(train[0]), gen[0]['masks'])
  np.testing.assert_array_equal(image_io.load_record_image(train[0]),
                                gen[0]['image'])
  # Polygons decode as pycocotools' annToMask (the 20x10 rectangle).
  poly = coco.decode_masks(train[2])[-1]
  np.testing.assert_array_equal(
      poly, train.coco.annToMask(train.coco.anns[d['annotations'][-1]['id']]))
  assert poly[4:14, 4:24].all() and poly.sum() == 200


def test_coco_source_errors(tmp_path):
  with pytest.raises(coco.CocoFormatError, match='not found'):
    coco.CocoSource(str(tmp_path / 'nope'), 'train', True)
  with pytest.raises(coco.CocoFormatError, match='instances_val.json'):
    coco.CocoSource(str(tmp_path), 'val', True)


def test_tfds_round_trip(tiny_coco, tmp_path):
  pytest.importorskip('tensorflow_datasets')
  from msrcnn_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  root, _ = tiny_coco
  builder = tfds_builder.prepare(root, str(tmp_path / 'tfds'))
  assert builder.name == 'coco_instance_masks'
  for train in (True, False):
    ref = coco.CocoSource(root, 'train', train=train)
    got = tfds_builder.TfdsSource(str(tmp_path / 'tfds'), 'train', train)
    assert got.cat_ids == ref.cat_ids and got.class_names == ref.class_names
    assert len(got) == len(ref)
    for i in range(len(ref)):
      a, b = got[i], ref[i]
      assert a['image_id'] == b['image_id']
      assert (a['height'], a['width']) == (b['height'], b['width'])
      np.testing.assert_array_equal(a['boxes'], b['boxes'])
      np.testing.assert_array_equal(a['labels'], b['labels'])
      np.testing.assert_array_equal(coco.decode_masks(a),
                                    coco.decode_masks(b))
      np.testing.assert_array_equal(image_io.load_record_image(a),
                                    image_io.load_record_image(b))
  # The evaluation ground truth keeps every annotation (crowd included).
  ref_gt, got_gt = ref.coco, got.coco
  assert sorted(got_gt.getImgIds()) == sorted(ref_gt.getImgIds())
  for img_id in ref_gt.getImgIds():
    ra = ref_gt.loadAnns(ref_gt.getAnnIds(imgIds=[img_id]))
    ga = got_gt.loadAnns(got_gt.getAnnIds(imgIds=[img_id]))
    assert [(a['category_id'], a['iscrowd'], a['bbox']) for a in ra] == [
        (a['category_id'], int(a['iscrowd']), a['bbox']) for a in ga]
    for x, y in zip(ra, ga):
      np.testing.assert_array_equal(ref_gt.annToMask(x), got_gt.annToMask(y))


# --------------------------------------------------------------- pipeline
def _mixed_records(n=10):
  """In-memory records of three shapes: 3 buckets at img_scale (128, 64)."""
  sizes = [(32, 64), (64, 32), (48, 48)]
  recs = []
  for i in range(n):
    h, w = sizes[i % 3]
    img, masks, boxes, labels = synthetic.generate(
        np.random.default_rng(i), h, w, 6, 3)
    recs.append(dict(image_id=i + 1, file_name=f'{i}.png', path=None,
                     height=h, width=w, boxes=boxes, labels=labels,
                     image=img, masks=masks))
  return recs


def _batches(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _assert_batches_equal(xs, ys):
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_pipeline_deterministic_resumable_and_sharded():
  cfg = _small_cfg()
  recs = _mixed_records()
  mk = lambda **kw: pipeline.make_train_iterator(
      cfg, recs, **dict(dict(batch_size_per_host=2, seed=5, start_step=0,
                             process_index=0, process_count=1), **kw))
  first = _batches(mk(), 4)
  _assert_batches_equal(first, _batches(mk(), 4))
  # Static shape per batch; buckets mixed across steps.
  shapes = {b['image'].shape for b in first}
  assert len(shapes) > 1 and all(s[0] == 2 for s in shapes)
  # Same data without worker threads.
  cfg.data.num_workers = 0
  _assert_batches_equal(first, _batches(mk(), 4))
  cfg.data.num_workers = 2
  # Resume: starting at step 3 gives step 3's batch.
  _assert_batches_equal(first[3:], _batches(mk(start_step=3), 1))
  # Host sharding: host p of 2 (B=1) gets half p of the 1-host B=2 batch.
  for p in (0, 1):
    shard = _batches(mk(batch_size_per_host=1, process_index=p,
                        process_count=2), 4)
    for s, full in zip(shard, first):
      for k in s:
        np.testing.assert_array_equal(s[k], full[k][p:p + 1], err_msg=k)


def test_train_plan_epochs_and_disjoint_hosts():
  ids = np.array([0, 1, 2] * 4)  # 12 records, 4 per bucket
  plan = pipeline.TrainPlan(ids, global_batch=4, seed=0)
  assert plan.steps_per_epoch == 3
  e0 = [idx.tolist() for _, idx in plan.epoch_batches(0)]
  e1 = [idx.tolist() for _, idx in plan.epoch_batches(1)]
  assert e0 != e1  # reshuffled every epoch
  for epoch in (e0, e1):
    assert sorted(sum(epoch, [])) == list(range(12))  # each image once
    for batch in epoch:
      assert len(set(ids[batch])) == 1  # one bucket per batch
      # Two hosts of 2 take disjoint halves.
      assert not set(batch[:2]) & set(batch[2:])
  again = pipeline.TrainPlan(ids, global_batch=4, seed=0)
  assert [i.tolist() for _, i in again.epoch_batches(1)] == e1
  # A bucket with fewer images than a batch is filled from itself.
  small = pipeline.TrainPlan(np.array([0, 0, 0, 1]), global_batch=2, seed=0)
  assert small.steps_per_epoch == 3
  for b, idx in small.epoch_batches(0):
    assert set(np.array([0, 0, 0, 1])[idx]) == {b}


def test_eval_pipeline_covers_every_image_once():
  cfg = _small_cfg()
  recs = _mixed_records(7)
  seen = []
  for p in (0, 1):
    it = pipeline.make_eval_iterator(cfg, recs, batch_size_per_host=2,
                                     process_index=p, process_count=2)
    batches = list(it)
    assert len(batches) == 3  # one per bucket (3, 2, 2 images; 4 per step)
    for b in batches:
      assert b['image'].shape[0] == 2 and b['valid'].dtype == np.bool_
      assert b['ori_shape'].dtype == np.int32
      assert b['image_id'].dtype == np.int64
      seen += b['image_id'][b['valid']].tolist()
      for j in range(2):
        rec = recs[int(b['image_id'][j]) - 1]
        assert tuple(b['ori_shape'][j]) == (rec['height'], rec['width'])
  assert sorted(seen) == list(range(1, 8))


def test_build_source_synthetic():
  cfg = _small_cfg()
  cfg.data.source = 'synthetic'
  assert len(pipeline.build_source(cfg, train=True)) == 6
  assert len(pipeline.build_source(cfg, train=False)) == 3
  cfg.data.source = 'nope'
  with pytest.raises(ValueError, match='nope'):
    pipeline.build_source(cfg, train=True)


def test_trainer_form_config_and_start_step():
  """``make_train_iterator(config, start_step)``, as training.trainer calls."""
  cfg = _small_cfg()
  cfg.data.source = 'synthetic'
  cfg.train.global_batch_size = 2
  cfg.seed = 4
  got = _batches(pipeline.make_train_iterator(cfg, 1), 1)
  want = _batches(pipeline.make_train_iterator(
      cfg, None, batch_size_per_host=2, seed=4, start_step=1,
      process_index=0, process_count=1), 1)
  _assert_batches_equal(got, want)
