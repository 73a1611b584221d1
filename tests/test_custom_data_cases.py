"""Malformed custom datasets and checkpoints, as users bring them (issue 10).

Each case of ``tests/fixtures/cases`` (copied from ``../shared/cases``; the
README of each names the public bug report) and the other inputs of its
kind, through the code that reads them:

- invalid polygon parts (0, 1, 2 points, odd length, NaN; alone or beside a
  valid part; crowd; no or empty segmentation; RLE of another size): parts
  dropped, annotations without a valid part skipped, counted warnings naming
  annotation and image ids, masks of what is left, and pycocotools'
  COCOeval runs on the cleaned ground truth (perfect detections give AP 1);
- a missing ``area`` (polygons, RLE, crowd): computed from the mask, equal
  to the areas the case author wrote for the same polygons / to the mask's
  pixel count;
- an empty image list, no usable training annotation (none, crowd only,
  unknown categories, images below min_size), missing image files (train
  vs val, an unannotated image that training skips), EXIF orientation vs
  the annotated size (JPEG, PNG, TIFF; orientations 3, 6, 8; displayed size
  accepted; a plain wrong size named without EXIF): refused before any work
  with one message naming file and ids;
- the max-instances warning counts each over-full image once;
- the converter: v2 checkpoints with other class counts (3, 81, 91) get the
  class-count message, never the v1 one; v1 metadata is still refused;
- the command-line contract: user errors end in one ``error: ...`` line and
  exit status 1 without a traceback; programming errors keep theirs.

Cost: the in-process tests take about 10 s together; each command-line run
5-20 s (importing JAX), about 1.5 min in all on the 2-core CI machine.
"""

import json
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
import pytest
import torch

from conftest import assert_one_error_line, fixture_config, fixture_path
from msrcnn_jax import errors
from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.convert import mmdet
from msrcnn_jax.data import coco, image_io, pipeline

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
CASES = os.path.join(_TESTS, 'fixtures', 'cases')
CATS = [dict(id=1, name='cat1'), dict(id=2, name='cat2'),
        dict(id=3, name='cat3')]


def _case(name):
  return os.path.join(CASES, name)


def _write_coco(root, split, images, annotations, categories=CATS):
  """A COCO directory split; ``images``: (id, file name, pixels or None)."""
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  os.makedirs(os.path.join(root, split), exist_ok=True)
  entries = []
  for img_id, name, pixels, *hw in images:
    h, w = hw if hw else pixels.shape[:2]
    entries.append(dict(id=img_id, file_name=name, height=h, width=w))
    if pixels is not None:
      cv2.imwrite(os.path.join(root, split, name), pixels)
  path = coco.annotation_file(root, split)
  with open(path, 'w') as f:
    json.dump(dict(images=entries, annotations=annotations,
                   categories=categories), f)
  return path


def _rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return dict(size=list(rle['size']), counts=rle['counts'].decode('ascii'))


def _ann(ann_id, seg, bbox, image_id=1, category_id=1, **kw):
  return dict(id=ann_id, image_id=image_id, category_id=category_id,
              bbox=bbox, iscrowd=0, segmentation=seg, **kw)


def _perfect_ap(coco_gt, iou_type):
  """COCO AP of detections equal to the ground truth (non-crowd)."""
  dets = []
  for a in coco_gt.loadAnns(coco_gt.getAnnIds(iscrowd=False)):
    h, w = (coco_gt.imgs[a['image_id']][k] for k in ('height', 'width'))
    dets.append(dict(image_id=a['image_id'], category_id=a['category_id'],
                     bbox=a['bbox'], score=1.0,
                     segmentation=coco.segmentation_to_rle(
                         a['segmentation'], h, w)))
  ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  return ev.stats[0]


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and r.name == coco.__name__]


# ------------------------------------------------------------ polygons
def test_poly_2pt_case_is_skipped_with_a_warning(caplog):
  caplog.set_level(logging.WARNING)
  train = coco.CocoSource(_case('poly_2pt'), 'train', train=True)
  assert [len(r['labels']) for r in train] == [3, 3]
  assert 9001 not in train.coco.anns and len(train.coco.anns) == 6
  (msg,) = _warnings(caplog)
  assert 'instances_train.json: skipped 1 annotation(s)' in msg
  assert 'annotation 9001 (image 1)' in msg
  val = coco.CocoSource(_case('poly_2pt'), 'val', train=False)
  assert 9001 not in val.coco.anns
  # pycocotools' own loader would crash in COCOeval (cocoapi#369).
  assert _perfect_ap(val.coco, 'segm') == pytest.approx(1.0)


def test_invalid_polygon_parts_of_every_kind(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  img = np.zeros((64, 80, 3), np.uint8)
  rect = lambda x1, y1, x2, y2: [x1, y1, x2, y1, x2, y2, x1, y2]
  crowd = np.zeros((64, 80), np.uint8)
  crowd[40:60, 50:75] = 1
  nan = float('nan')
  anns = [
      _ann(1, [rect(4, 4, 24, 14)], [4, 4, 20, 10]),
      # A valid part beside a 2-point one: the valid one is kept.
      _ann(2, [rect(40, 4, 60, 24), [1, 1, 2, 2]], [40, 4, 20, 20]),
      _ann(3, [[10, 30, 20, 30]], [10, 30, 10, 1]),        # 2 points
      _ann(4, [[10, 30]], [10, 30, 1, 1]),                  # 1 point
      _ann(5, [[]], [10, 30, 1, 1]),                        # 0 points
      # A 3-point part beside an odd-length and a NaN one.
      _ann(6, [[4, 30, 24, 30, 4, 50], [4, 30, 24, 30, 4],
               [nan, 30, 24, 30, 4, 50]], [4, 30, 20, 20]),
      _ann(7, [], [10, 30, 5, 5]),                          # empty
      dict(id=8, image_id=1, category_id=1, bbox=[10, 30, 5, 5],
           iscrowd=0),                                      # none
      dict(_ann(9, [[50, 40, 60, 50]], [50, 40, 10, 10]), iscrowd=1),
      dict(_ann(10, _rle(crowd), [50, 40, 25, 20]), iscrowd=1),
      _ann(11, _rle(np.ones((32, 32), np.uint8)), [0, 0, 32, 32]),
  ]
  _write_coco(str(tmp_path), 'train', [(1, 'a.png', img)], anns)
  train = coco.CocoSource(str(tmp_path), 'train', train=True)
  assert sorted(train.coco.anns) == [1, 2, 6, 10]
  (rec,) = train.records
  np.testing.assert_array_equal(rec['boxes'], [[4, 4, 24, 14],
                                               [40, 4, 60, 24],
                                               [4, 30, 24, 50]])
  masks = coco.decode_masks(rec)
  assert masks[0][4:14, 4:24].all() and masks[0].sum() == 200
  assert masks[1][4:24, 40:60].all() and masks[1].sum() == 400
  assert masks[1][:3, :3].sum() == 0  # nothing of the 2-point part
  assert 150 < masks[2].sum() < 250  # the right triangle, legs 20
  dropped, skipped, _ = _warnings(caplog)  # and the computed areas
  assert 'dropped 3 invalid polygon part(s) from 2 annotation(s)' in dropped
  assert 'annotation 2 (image 1), annotation 6 (image 1)' in dropped
  assert 'skipped 7 annotation(s) without a valid segmentation' in skipped
  for i, why in ((3, 'none of its 1 polygon part(s) valid'),
                 (7, 'no segmentation'), (8, 'no segmentation'),
                 (9, 'none of its 1'), (11, 'RLE not of the image size')):
    assert f'annotation {i} (image 1): {why}' in skipped
  assert _perfect_ap(train.coco, 'segm') == pytest.approx(1.0)
  assert _perfect_ap(train.coco, 'bbox') == pytest.approx(1.0)


# ------------------------------------------------------------------ area
def test_missing_area_is_computed_from_the_mask(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  src = coco.CocoSource(_case('no_area_key'), 'train', train=True)
  with open(os.path.join(_case('poly_2pt'), 'annotations',
                         'instances_train.json')) as f:
    written = {a['id']: a['area'] for a in json.load(f)['annotations']}
  # Same polygons as poly_2pt, whose author wrote their areas.
  assert {i: a['area'] for i, a in src.coco.anns.items()} == {
      i: written[i] for i in src.coco.anns}
  assert 'have no "area"' in _warnings(caplog)[0]
  val = coco.CocoSource(_case('no_area_key'), 'val', train=False)
  assert _perfect_ap(val.coco, 'segm') == pytest.approx(1.0)  # no KeyError

  # RLE, crowd, a given area kept as given, a zero-area polygon.
  m1 = np.zeros((64, 80), np.uint8)
  m1[5:25, 10:31] = 1
  m2 = np.zeros((64, 80), np.uint8)
  m2[30:60, 40:70] = 1
  flat = m2.flatten(order='F')  # uncompressed RLE: column-major runs
  edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
  runs = np.diff(np.r_[0, edges]).tolist()
  uncompressed = dict(size=[64, 80], counts=runs)
  np.testing.assert_array_equal(coco.segmentation_to_mask(uncompressed, 64,
                                                          80), m2)
  anns = [_ann(1, _rle(m1), [10, 5, 21, 20]),
          dict(_ann(2, uncompressed, [40, 30, 30, 30]), iscrowd=1),
          _ann(3, [[2, 2, 6, 2, 6, 6, 2, 6]], [2, 2, 4, 4], area=123.0),
          _ann(4, [[0, 0, 10, 10, 20, 20]], [0, 0, 20, 20])]
  _write_coco(str(tmp_path), 'train', [(1, 'a.png',
                                        np.zeros((64, 80, 3), np.uint8))],
              anns)
  src = coco.CocoSource(str(tmp_path), 'train', train=True)
  areas = {i: a['area'] for i, a in src.coco.anns.items()}
  assert areas == {1: float(m1.sum()), 2: float(m2.sum()), 3: 123.0, 4: 0.0}
  # mmdetection's filter then drops the zero-area one and the crowd one.
  np.testing.assert_array_equal(src.records[0]['boxes'],
                                [[10, 5, 31, 25], [2, 2, 6, 6]])


# ------------------------------------------------------ refused up front
def test_no_usable_training_annotation_is_refused(tmp_path):
  with pytest.raises(coco.CocoFormatError) as e:
    coco.CocoSource(_case('zero_ann_dataset'), 'train', train=True)
  assert 'no usable training annotation in' in str(e.value)
  assert 'instances_train.json: its 2 image(s) (ids 1, 2)' in str(e.value)
  assert len(coco.CocoSource(_case('zero_ann_dataset'), 'train',
                             train=False)) == 2  # evaluation keeps them

  img = np.zeros((64, 80, 3), np.uint8)
  poly = [[4, 4, 24, 4, 24, 14, 4, 14]]
  kinds = {
      'crowd_only': [dict(_ann(1, poly, [4, 4, 20, 10]), iscrowd=1)],
      'unknown_category': [_ann(1, poly, [4, 4, 20, 10], category_id=9)],
      'outside_image': [_ann(1, poly, [100, 100, 20, 10])],
  }
  for name, anns in kinds.items():
    root = str(tmp_path / name)
    _write_coco(root, 'train', [(1, 'a.png', img)], anns)
    with pytest.raises(coco.CocoFormatError, match='no usable training'):
      coco.CocoSource(root, 'train', train=True)
    assert len(coco.CocoSource(root, 'train', train=False)) == 1
  root = str(tmp_path / 'small')
  _write_coco(root, 'train', [(1, 'a.png', np.zeros((20, 80, 3), np.uint8))],
              [_ann(1, poly, [4, 4, 20, 10])])
  with pytest.raises(coco.CocoFormatError, match='shorter side >= 32'):
    coco.CocoSource(root, 'train', train=True)

  root = str(tmp_path / 'no_images')
  _write_coco(root, 'val', [], [])
  for train in (True, False):
    with pytest.raises(coco.CocoFormatError, match=r'lists no images'):
      coco.CocoSource(root, 'val', train=train)
  root = str(tmp_path / 'bad_entries')
  _write_coco(root, 'val', [(1, 'a.png', img)],
              [dict(id=7, image_id=1, category_id=1, segmentation=poly)])
  with pytest.raises(coco.CocoFormatError,
                     match=r"annotation entry 0 .* has no bbox"):
    coco.CocoSource(root, 'val', train=False)


def test_missing_image_files_are_refused(tmp_path):
  with pytest.raises(coco.CocoFormatError) as e:
    coco.CocoSource(_case('missing_image_file'), 'train', train=True)
  assert 'missing: ' in str(e.value)
  assert os.path.join('train', 'img2.png') + ' (image 2)' in str(e.value)
  assert '1 of the 2 image files' in str(e.value)
  with pytest.raises(coco.CocoFormatError, match=r'img102\.png \(image 102\)'):
    coco.CocoSource(_case('missing_image_file'), 'val', train=False)

  # An image without annotations: training skips it, evaluation needs it.
  img = np.zeros((64, 80, 3), np.uint8)
  root = str(tmp_path / 'c')
  _write_coco(root, 'val', [(1, 'a.png', img), (2, 'gone.png', None, 64, 80)],
              [_ann(1, [[4, 4, 24, 4, 24, 14, 4, 14]], [4, 4, 20, 10])])
  assert len(coco.CocoSource(root, 'val', train=True)) == 1
  with pytest.raises(coco.CocoFormatError, match=r'gone\.png \(image 2\)'):
    coco.CocoSource(root, 'val', train=False)
  os.rename(os.path.join(root, 'val'), os.path.join(root, 'elsewhere'))
  with pytest.raises(coco.CocoFormatError, match='image directory not found'):
    coco.CocoSource(root, 'val', train=False)


def _save(path, pixels_rgb, orientation, fmt):
  exif = Image.Exif()
  if orientation:
    exif[0x0112] = orientation
  Image.fromarray(pixels_rgb).save(path, fmt, exif=exif.tobytes())


def test_exif_orientation_against_the_annotated_size(tmp_path):
  with pytest.raises(coco.CocoFormatError) as e:
    coco.CocoSource(_case('exif_rotation'), 'val', train=False)
  msg = str(e.value)
  assert 'rotated.jpg (image 101)' in msg
  assert 'gives width x height 128x96 but the image decodes to 96x128' in msg
  assert 'EXIF Orientation=6 rotates the stored 128x96' in msg

  rgb = np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)
  poly = [[4, 4, 24, 4, 24, 14, 4, 14]]
  # (format, orientation, annotated (h, w), refused, EXIF in the message)
  kinds = [('JPEG', 6, (128, 96), False, False),   # displayed size
           ('JPEG', 3, (96, 128), False, False),   # 180 degrees: same size
           ('JPEG', 8, (96, 128), True, True),     # stored size
           ('PNG', 6, (96, 128), True, True),
           ('PNG', 6, (128, 96), False, False),
           ('TIFF', 6, (128, 96), False, False),
           ('TIFF', 5, (96, 128), True, True),
           ('PNG', 0, (80, 100), True, False)]      # plainly wrong size
  for k, (fmt, orient, hw, refused, exif) in enumerate(kinds):
    root = str(tmp_path / f'k{k}')
    os.makedirs(os.path.join(root, 'val'))
    name = f'x.{fmt.lower()}'
    _save(os.path.join(root, 'val', name), rgb, orient, fmt)
    _write_coco(root, 'val', [(5, name, None, *hw)],
                [_ann(1, poly, [4, 4, 20, 10], image_id=5)])
    # Independent of the header check: what mmcv's imfrombytes(flag='color')
    # decodes (cv2.imdecode, IMREAD_COLOR).
    decoded = cv2.imdecode(np.fromfile(os.path.join(root, 'val', name),
                                       np.uint8), cv2.IMREAD_COLOR).shape[:2]
    assert (decoded != hw) == refused, (fmt, orient, decoded, hw)
    if not refused:
      src = coco.CocoSource(root, 'val', train=False)
      assert image_io.load_record_image(src[0]).shape[:2] == hw
      continue
    with pytest.raises(coco.CocoFormatError) as e:
      coco.CocoSource(root, 'val', train=False)
    assert f'{name} (image 5)' in str(e.value)
    assert ('EXIF Orientation' in str(e.value)) == exif, str(e.value)

  # Sizes the header check cannot see are caught when decoding.
  cfg = ms_rcnn_config()
  rec = dict(image_id=7, path=os.path.join(tmp_path, 'k0', 'val', 'x.jpeg'),
             height=96, width=128)
  with pytest.raises(image_io.ImageReadError, match=r'x\.jpeg \(image 7\)'):
    pipeline.eval_example(rec, cfg.data, (800, 800))


# ------------------------------------------------------- max instances
def test_max_instances_warning_counts_each_image_once(caplog):
  caplog.set_level(logging.WARNING)
  cfg = ms_rcnn_config()
  d = cfg.data
  d.img_scale, d.buckets = (128, 128), ((128, 128),)
  d.max_instances, d.gt_mask_crop_size, d.num_workers = 100, 8, 0
  src = coco.CocoSource(_case('many_instances'), 'train', train=True)
  assert [len(r['labels']) for r in src] == [150, 3]
  it = pipeline.make_train_iterator(cfg, src, batch_size_per_host=1, seed=0,
                                    process_index=0, process_count=1)
  batches = [next(it) for _ in range(6)]  # 3 epochs of the 2 images
  it.close()
  assert sum(int(b['gt_valid'].sum() == 100) for b in batches) == 3
  assert it.truncated_images == 1
  msgs = [r.getMessage() for r in caplog.records
          if r.name == pipeline.__name__]
  assert len(msgs) == 1, msgs
  assert msgs[0].startswith('1 distinct training image(s) so far have more '
                            'than max_instances=100 instances (latest: '
                            'image 1)')


# ----------------------------------------------------------- converter
def _fixture_state_dict():
  ckpt = torch.load(fixture_path('r50_caffe_tiny', 'checkpoint.pth'),
                    map_location='cpu', weights_only=False)
  return ckpt['state_dict'], ckpt.get('meta', {})


def _with_classes(sd, n):
  """The fixture model's state_dict with heads for ``n`` classes (v2)."""
  rows = {'fc_cls': n + 1, 'fc_reg': 4 * n, 'conv_logits': n,
          'fc_mask_iou': n}
  out = {}
  for k, v in sd.items():
    layer = k.split('.')[-2]
    if layer in rows:
      v = torch.randn((rows[layer],) + tuple(v.shape[1:]))
    out[k] = v
  return out


def _set_classes(cfg, n):
  cfg.model.num_classes = n     # the one class-count key every head reads
  return cfg


def test_v2_checkpoint_of_another_class_count_is_not_called_v1():
  sd, meta = _fixture_state_dict()
  for n in (3, 81, 91):
    other = _with_classes(sd, n)
    meta_n = dict(meta, CLASSES=tuple(f'c{i}' for i in range(n)))
    with pytest.raises(mmdet.ConversionError) as e:
      mmdet.convert_state_dict(other, fixture_config('r50_caffe_tiny'),
                               meta=meta_n)
    first = str(e.value).splitlines()[0]
    assert 'v1.x' not in str(e.value)
    assert (f"the checkpoint's heads are for {n} classes (fc_cls {n + 1}, "
            f'fc_reg {4 * n}, conv_logits {n}, fc_mask_iou {n} rows; meta '
            f'CLASSES lists {n} names) but the config builds heads for 80 '
            'classes') in first
    variables, report = mmdet.convert_state_dict(
        other, _set_classes(fixture_config('r50_caffe_tiny'), n),
        meta=meta_n)
    assert report.ok
    np.testing.assert_array_equal(
        variables['params']['roi_head']['bbox_head']['fc_cls']['kernel'],
        other['roi_head.bbox_head.fc_cls.weight'].numpy().T)
  # The metadata of a v1 model is refused as v1, even with v2 keys.
  with pytest.raises(mmdet.ConversionError, match="meta mmdet_version '1.0"):
    mmdet.convert_state_dict(sd, fixture_config('r50_caffe_tiny'),
                             meta=dict(meta, mmdet_version='1.0rc1+0a8c2a4'))


# ------------------------------------------------ command-line contract
def _cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore',
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _train(coco_dir, *extra):
  return _cli('train.py', '--config', 'configs/quickstart_synthetic.py',
              '--config.data.source=coco', f'--config.data.coco_dir={coco_dir}',
              '--config.data.train_split=train',
              '--config.data.val_split=val', '--config.train.max_steps=1',
              *extra)


@pytest.mark.slow
def test_cli_dataset_errors_are_one_line(tmp_path):
  assert_one_error_line(_train(_case('zero_ann_dataset'),
                         f'--workdir={tmp_path / "z"}'),
                  'no usable training annotation', 'instances_train.json',
                  'ids 1, 2')
  assert_one_error_line(_train(_case('missing_image_file'),
                         f'--workdir={tmp_path / "m"}'),
                  'image files of', 'img102.png (image 102)')
  assert_one_error_line(_cli('-m', 'msrcnn_jax.evaluate', '--config',
                       'configs/quickstart_synthetic.py', '--checkpoint',
                       str(tmp_path / 'not_read'), '--coco-dir',
                       _case('exif_rotation'), '--split', 'val'),
                  'rotated.jpg (image 101)', 'EXIF Orientation=6')
  assert_one_error_line(_train(str(tmp_path / 'nowhere'),
                         f'--workdir={tmp_path / "n"}'),
                  'COCO directory not found', 'nowhere')


@pytest.mark.slow
def test_cli_config_checkpoint_and_path_errors_are_one_line(tmp_path):
  # Config mistakes: a typo in an override of the default config, a
  # missing config file, an unknown data source, an unparsable value.
  assert_one_error_line(_cli('train.py', '--config.train.max_step=5'),
                  'unknown config key train.max_step',
                  'did you mean train.max_steps')
  assert_one_error_line(_cli('train.py', '--config', str(tmp_path / 'nope.py')),
                  'config file not found', 'nope.py')
  assert_one_error_line(_cli('train.py', '--config.train.max_steps=abc'),
                  '--config.train.max_steps=abc')
  assert_one_error_line(_cli('train.py', '--config.data.source=cocoa',
                       f'--workdir={tmp_path / "w"}'),
                  "data.source must be 'coco', 'tfds' or 'synthetic', got "
                  "'cocoa'")
  # A v2 checkpoint fine-tuned on 81 classes, converted with an 80-class
  # config (the ckpt_81cls case, rebuilt from the fixture model).
  sd, meta = _fixture_state_dict()
  pth = str(tmp_path / 'checkpoint_81cls.pth')
  torch.save(dict(state_dict=_with_classes(sd, 81),
                  meta=dict(meta, CLASSES=tuple(range(81)))), pth)
  cfg = tmp_path / 'tiny.py'
  cfg.write_text(f'import sys\nsys.path.insert(0, {_TESTS!r})\n'
                 'from conftest import fixture_config\n\n'
                 "def get_config():\n  return fixture_config('r50_caffe_tiny')"
                 '\n')
  proc = _cli('convert_torch_weights.py', '--config', str(cfg),
              '--checkpoint', pth, '--output', str(tmp_path / 'out'))
  assert_one_error_line(proc, 'checkpoint_81cls.pth', 'heads are for 81 classes',
                  'builds heads for 80 classes')
  assert 'v1.x' not in proc.stderr and 'mis-shaped: 8' in proc.stderr
  assert not (tmp_path / 'out').exists()
  # A missing image and a missing checkpoint directory.
  assert_one_error_line(_cli('-m', 'msrcnn_jax.predict', '--config', str(cfg),
                       '--checkpoint', str(tmp_path / 'out'),
                       str(tmp_path / 'gone.png')),
                  'image file not found', 'gone.png')
  assert_one_error_line(_cli('-m', 'msrcnn_jax.predict', '--config', str(cfg),
                       '--checkpoint', str(tmp_path / 'out'),
                       fixture_path('chelsea.png')),
                  'checkpoint directory not found', 'out')


def test_run_reports_user_errors_and_keeps_programming_tracebacks():
  script = ('import sys\nfrom msrcnn_jax import errors\n'
            'def main(argv):\n'
            '  if argv[1] == "user":\n'
            '    raise errors.UserError("bad input x.json (id 3)\\ncontext")\n'
            '  return {}["bug"]\n'
            'errors.run(main)\n')
  user = _cli('-c', script, 'user')
  assert assert_one_error_line(user) == 'error: bad input x.json (id 3)'
  assert user.stderr.splitlines()[0] == 'context'
  bug = _cli('-c', script, 'bug')
  assert bug.returncode != 0 and 'Traceback' in bug.stderr
  assert "KeyError: 'bug'" in bug.stderr and 'error: ' not in bug.stderr
  assert issubclass(coco.CocoFormatError, errors.UserError)
  assert issubclass(image_io.ImageReadError, errors.UserError)
  assert issubclass(mmdet.ConversionError, errors.UserError)
