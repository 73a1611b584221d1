"""The data-side bad inputs of issue 19, and their neighbours.

Cases from ``tests/fixtures/cases`` (copied from ``../shared/cases``) and
small COCO directories written in ``tmp_path``:

- RLE validated at load time: ``coco_rle_short_counts`` (counts '0') and
  ``coco_rle_invalid_counts`` ('abc'), and built here: compressed and
  uncompressed counts summing to less or more than h*w, negative runs
  (a negative first run, a negative difference), a string ending
  mid-number, characters outside the alphabet, non-integer counts, a size
  that is not the image's, no size. Each is skipped, never decoded, with
  one counted warning naming annotation and image ids and the reason; the
  masks of what is kept equal pycocotools' decodes. The string decoder
  equals pycocotools' encoder on random masks (runs up to 10^6 pixels).
- Duplicate image ids (``coco_duplicate_image_ids``: the id and both file
  names), duplicate annotation ids (the id and both images), and a height
  of 0: refused before any work.
- Categories without ``name`` (``coco_category_no_name``): named from the
  config's class_names (else 'category <id>') with a warning, in training
  and through ``evaluate_model`` (a stand-in predictor that returns the
  ground truth: AP 1).
- Degenerate sizes (3000x4, 1x500 with the quickstart's img_scale 128):
  refused by ``build_source`` naming file and id (evaluation and training
  splits), and by ``Predictor.predict_images`` naming the image file.
- Bad files: ``coco_zero_byte_val`` and a non-image file refused at
  start-up naming the file; ``coco_truncated_jpeg`` reported as "corrupt or
  truncated" (also when the decoder returns a partial image, as some OpenCV
  builds do; truncated progressive JPEG and PNG; a JPEG with bytes after
  its end marker still decodes); mid-run, a bad training image is replaced
  by the next image of its bucket (batches equal to a resumed run's and to
  a run without worker threads, the replacement's pixels and flip exact),
  a bad evaluation image is not evaluated, and the run stops with one
  error once more than ``data.max_bad_image_fraction`` of the split is bad.
- Two command-line runs of train.py: the zero-byte val image and the
  truncated JPEG each end in one ``error:`` line before any step.

Cost: measured 26 s in all on the shared 2-core machine: about 7 s
in-process (5 s of it importing the evaluation code) and 15 s for the two
train.py runs (they stop before anything is compiled).
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from conftest import assert_one_error_line
from msrcnn_jax import config as config_lib
from msrcnn_jax.data import coco, image_io, pipeline, transforms
from msrcnn_jax.errors import UserError

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
CASES = os.path.join(_TESTS, 'fixtures', 'cases')
CATS = [dict(id=1, name='cat1'), dict(id=2, name='cat2'),
        dict(id=3, name='cat3')]


def _case(name):
  return os.path.join(CASES, name)


def _quickstart_config(coco_dir, **data):
  sys.path.insert(0, os.path.join(_ROOT, 'configs'))
  try:
    import quickstart_synthetic  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  cfg = quickstart_synthetic.get_config()
  cfg.data.update(dict(source='coco', coco_dir=str(coco_dir),
                       train_split='train', val_split='val'), **data)
  return cfg


def _write_coco(root, split, images, annotations, categories=CATS):
  """A COCO split; ``images``: (id, file name, pixels or None[, h, w])."""
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  os.makedirs(os.path.join(root, split), exist_ok=True)
  entries = []
  for img_id, name, pixels, *hw in images:
    h, w = hw if hw else pixels.shape[:2]
    entries.append(dict(id=img_id, file_name=name, height=h, width=w))
    if pixels is not None:
      assert cv2.imwrite(os.path.join(root, split, name), pixels)
  path = coco.annotation_file(root, split)
  with open(path, 'w') as f:
    json.dump(dict(images=entries, annotations=annotations,
                   categories=categories), f)
  return path


def _ann(ann_id, seg, bbox=(2, 2, 20, 20), image_id=1, category_id=1):
  return dict(id=ann_id, image_id=image_id, category_id=category_id,
              bbox=list(bbox), iscrowd=0, segmentation=seg, area=100.0)


def _warnings(caplog, logger_name):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and r.name == logger_name]


def _rle_string(runs):
  """pycocotools' ``rleToString`` for any (also negative) run lengths."""
  out = bytearray()
  for i, run in enumerate(runs):
    x = int(run) - (int(runs[i - 2]) if i > 2 else 0)
    more = True
    while more:
      c = x & 0x1f
      x >>= 5
      more = x != -1 if c & 0x10 else x != 0
      out.append((c | (0x20 if more else 0)) + 48)
  return out.decode('ascii')


def _runs(mask):
  """The run lengths of a mask in column-major order, first run of 0s."""
  flat = np.asfortranarray(mask).reshape(-1, order='F').astype(np.int8)
  edges = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], edges, [flat.size]])
  runs = np.diff(bounds).tolist()
  return ([0] + runs) if flat[0] else runs


# ------------------------------------------------------------------ RLE
def test_rle_string_decoder_matches_pycocotools():
  rng = np.random.default_rng(0)
  for t in range(200):
    h, w = (int(v) for v in rng.integers(1, 50, 2))
    mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))
    assert coco.rle_string_counts(rle['counts']).tolist() == _runs(mask), t
    assert _rle_string(_runs(mask)) == rle['counts'].decode()
  # Long runs (several characters each) and large negative differences.
  mask = np.zeros((1000, 1200), np.uint8)
  mask[:, 1100:] = 1
  mask[500, 3], mask[20, 1150] = 1, 0
  rle = mask_utils.encode(np.asfortranarray(mask))
  assert coco.rle_string_counts(rle['counts']).tolist() == _runs(mask)
  runs = _runs(mask)
  assert max(runs) > 10**6 and min(np.diff(runs[2::2])) < -10**6


def test_rle_cases_are_skipped_at_load_never_decoded(caplog):
  caplog.set_level(logging.WARNING)
  for case, reason in (
      ('coco_rle_short_counts',
       'RLE counts summing to 0, not height x width = 16384'),
      ('coco_rle_invalid_counts',
       "RLE counts 'abc' not a valid COCO RLE string")):
    caplog.clear()
    src = coco.CocoSource(_case(case), 'train', train=True)
    assert 1 not in src.coco.anns and sorted(src.coco.anns) == [2, 3, 4]
    (msg,) = _warnings(caplog, coco.__name__)
    assert 'instances_train.json: skipped 1 annotation(s)' in msg
    assert f'annotation 1 (image 1): {reason}' in msg
    assert 'polygon' not in msg  # the polygon rule is not the reason
    with open(coco.annotation_file(_case(case), 'train')) as f:
      raw = {a['id']: a for a in json.load(f)['annotations']}
    for rec in src:
      ids = src.coco.getAnnIds(imgIds=[rec['image_id']])
      expected = np.stack([mask_utils.decode(dict(
          size=raw[i]['segmentation']['size'],
          counts=raw[i]['segmentation']['counts'].encode()))
                           for i in ids])
      np.testing.assert_array_equal(coco.decode_masks(rec), expected)
    # The val split of both cases is clean.
    caplog.clear()
    assert len(coco.CocoSource(_case(case), 'val', train=False).coco.anns) == 5
    assert not _warnings(caplog, coco.__name__)


def test_rle_neighbours_are_skipped_with_their_reason(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  h, w = 40, 50
  mask = np.zeros((h, w), np.uint8)
  mask[5:25, 8:30] = 1
  runs = _runs(mask)  # [5 + 8 * 40, 20, ...]
  good = _rle_string(runs)
  longer = _rle_string(runs[:-1] + [runs[-1] + 7])
  shorter = _rle_string(runs[:-1] + [runs[-1] - 7])
  # A negative first run, and a negative run from a difference (run 3 is
  # stored as run 3 - run 1): both sum to h * w.
  neg_first = _rle_string([-3, runs[0] + 3] + runs[1:])
  neg_diff = _rle_string(runs[:3] + [-4, runs[3] + 4] + runs[4:])
  assert sum(coco.rle_string_counts(neg_diff)) == h * w
  size = [h, w]
  bad = {
      3: (dict(size=size, counts=longer), f'summing to {h * w + 7}'),
      4: (dict(size=size, counts=shorter), f'summing to {h * w - 7}'),
      5: (dict(size=size, counts=runs[:-1] + [runs[-1] + 1]),
          f'summing to {h * w + 1}'),
      6: (dict(size=size, counts=runs[:-1]), 'summing to'),
      7: (dict(size=size, counts=[-5, h * w + 5]), 'negative run length'),
      8: (dict(size=size, counts=neg_first), 'negative run length'),
      9: (dict(size=size, counts=neg_diff), 'negative run length'),
      10: (dict(size=size, counts=good[:-1] + 'o'), 'not a valid COCO RLE'),
      11: (dict(size=size, counts=good + '~'), 'not a valid COCO RLE'),
      12: (dict(size=size, counts=good[:3] + '\u00e9'),
           'not a valid COCO RLE'),
      13: (dict(size=size, counts=[float(v) for v in runs]),
           'not an integer'),
      14: (dict(size=size, counts=None), 'RLE counts of type NoneType'),
      15: (dict(size=[w, h], counts=good), 'RLE not of the image size'),
      16: (dict(counts=good), 'RLE without a [height, width] "size"'),
      17: (dict(size=size, counts=''), 'not a valid COCO RLE'),
      18: (dict(size=size, counts=[h * w, 10**30]), 'beyond 64 bits'),
      19: (dict(size=size, counts=good[:2] + 'oooooo0'),
           'not a valid COCO RLE'),  # a 7-character number
  }
  anns = [_ann(1, dict(size=size, counts=good)),
          _ann(2, dict(size=size, counts=runs))]
  anns += [_ann(i, seg) for i, (seg, _) in bad.items()]
  _write_coco(str(tmp_path), 'train', [(1, 'a.png', np.zeros((h, w, 3),
                                                             np.uint8))],
              anns)
  src = coco.CocoSource(str(tmp_path), 'train', train=True)
  assert sorted(src.coco.anns) == [1, 2]
  np.testing.assert_array_equal(coco.decode_masks(src[0]),
                                np.stack([mask, mask]))
  (msg,) = _warnings(caplog, coco.__name__)
  assert f'skipped {len(bad)} annotation(s)' in msg
  # The first 10 are named with their reason, then a count.
  for i, (_, reason) in list(bad.items())[:10]:
    start = msg.index(f'annotation {i} (image 1): ')
    assert reason in msg[start:msg.find('annotation', start + 5)], (i, msg)
  assert f'and {len(bad) - 10} more' in msg
  for i, (seg, reason) in bad.items():
    problem = coco.rle_problem(seg, h, w)
    assert problem is not None and reason in problem, (i, problem)


# --------------------------------------------------------- duplicate ids
def test_duplicate_ids_are_refused_before_any_work(tmp_path):
  for split in ('train', 'val'):
    with pytest.raises(coco.CocoFormatError) as e:
      coco.CocoSource(_case('coco_duplicate_image_ids'), split,
                      train=split == 'train')
    assert (f'instances_{split}.json: image id 1 is used twice, by '
            '000000.png and by 000001.png') in str(e.value)
  img = np.zeros((32, 32, 3), np.uint8)
  images = [(1, 'a.png', img), (2, 'b.png', img)]
  _write_coco(str(tmp_path), 'train', images,
              [_ann(7, [[2, 2, 20, 2, 20, 20]]),
               _ann(8, [[2, 2, 20, 2, 20, 20]]),
               _ann(7, [[2, 2, 20, 2, 20, 20]], image_id=2)])
  with pytest.raises(coco.CocoFormatError,
                     match=r'annotation id 7 is used twice \(entries 0 and 2, '
                     r'on images 1 and 2\)'):
    coco.CocoSource(str(tmp_path), 'train', train=True)
  _write_coco(str(tmp_path), 'train', images + [(3, 'c.png', None, 0, 40)],
              [_ann(7, [[2, 2, 20, 2, 20, 20]])])
  with pytest.raises(coco.CocoFormatError,
                     match=r'image 3 \(c.png\) has height x width 0x40'):
    coco.CocoSource(str(tmp_path), 'train', train=True)


# ------------------------------------------------------ category names
class _GroundTruthPredictor:
  """Stands in for ``Predictor``: every valid image's ground truth as its
  detections (score 1, MaskIoU 1)."""

  timings = {}

  def __init__(self, coco_gt, cat_ids):
    self.gt = coco_gt
    self.label = {c: i for i, c in enumerate(cat_ids)}
    self.seen = []

  def predict_batches(self, batches):
    for batch in batches:
      for k in np.flatnonzero(batch['valid']):
        img_id = int(batch['image_id'][k])
        self.seen.append(img_id)
        info = self.gt.imgs[img_id]
        h, w = info['height'], info['width']
        anns = self.gt.loadAnns(self.gt.getAnnIds(imgIds=[img_id]))
        masks = []
        for a in anns:
          rle = coco.segmentation_to_rle(a['segmentation'], h, w)
          masks.append(dict(size=[h, w], counts=rle['counts'].decode()))
        n = len(anns)
        yield dict(
            image_id=img_id, file_name=info['file_name'], ori_shape=(h, w),
            boxes=np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in
                            (a['bbox'] for a in anns)],
                           np.float32).reshape(-1, 4),
            scores=np.ones(n, np.float32), mask_iou=np.ones(n, np.float32),
            mask_scores=np.ones(n, np.float32),
            labels=np.array([self.label[a['category_id']] for a in anns],
                            np.int64), masks=masks)


def _evaluate(cfg, out_dir):
  from msrcnn_jax.evaluation import run  # pylint: disable=g-import-not-at-top
  source = pipeline.build_source(cfg, train=False)
  predictor = _GroundTruthPredictor(source.coco, source.cat_ids)
  metrics, _ = run.evaluate_model(cfg, None, str(out_dir), source=source,
                                  progress=False, predictor=predictor)
  return source, predictor, metrics


def test_categories_without_name_train_and_evaluate(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  cfg = _quickstart_config(_case('coco_category_no_name'))
  train = pipeline.build_source(cfg, train=True)
  assert train.class_names == ('rectangle', 'ellipse', 'triangle')
  assert not _warnings(caplog, coco.__name__)
  config_lib.check_dataset_classes(cfg, train.cat_ids, train.class_names, 'x')
  cfg.data.class_names = ('box', 'disc', 'wedge')
  source, predictor, metrics = _evaluate(cfg, tmp_path / 'eval')
  assert source.class_names == ('box', 'disc', 'wedge')
  assert [c['name'] for c in source.coco.loadCats([1, 2, 3])] == [
      'box', 'disc', 'wedge']
  (msg,) = _warnings(caplog, coco.__name__)
  assert ('instances_val.json: 3 categories without a "name"; named from '
          "the config's data.class_names") in msg
  assert "1: 'box', 2: 'disc', 3: 'wedge'" in msg
  assert sorted(predictor.seen) == [1, 2]
  assert metrics['bbox_mAP'] == 1.0 and metrics['segm_mAP'] == 1.0
  # A category id the config does not list is named 'category <id>'.
  src = coco.CocoSource(_case('coco_category_no_name'), 'val', train=False,
                        category_names={1: 'box'})
  assert src.class_names == ('box', 'category 2', 'category 3')


# ---------------------------------------------------- degenerate sizes
def test_degenerate_sizes_are_refused_naming_the_image(tmp_path):
  cfg = _quickstart_config(tmp_path, min_size=0)
  ok = np.full((64, 64, 3), 90, np.uint8)
  # 3000x4 and 1x500 (width x height) resize to 128x0 and 0x128.
  for name, pixels in (('wide.png', np.zeros((4, 3000, 3), np.uint8)),
                       ('tall.png', np.zeros((500, 1, 3), np.uint8))):
    for split, train in (('val', False), ('train', True)):
      _write_coco(str(tmp_path), split,
                  [(1, 'ok.png', ok), (7, name, pixels)],
                  [_ann(1, [[2, 2, 20, 2, 20, 20]]),
                   _ann(2, [[0, 0, 1, 0, 1, 3]], bbox=(0, 0, 1, 3),
                        image_id=7)])
      with pytest.raises(transforms.DegenerateImageError) as e:
        pipeline.build_source(cfg, train=train)
      h, w = pixels.shape[:2]
      assert f'{split}/{name} (image 7) (width x height {w}x{h}) resizes' \
          in str(e.value)
      assert 'data.img_scale=(128, 128)' in str(e.value)
      assert isinstance(e.value, UserError)
  # The smallest sizes that still resize to one pixel are accepted.
  assert transforms.checked_rescale_size(3000, 12, (128, 128)) == (128, 1)
  with pytest.raises(transforms.DegenerateImageError,
                     match='an image .width x height 3000x11. resizes to '
                     '128x0'):
    transforms.checked_rescale_size(3000, 11, (128, 128))
  # predict reads image files through Predictor.predict_images.
  from msrcnn_jax.inference import Predictor  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'val' / 'tall.png')
  with pytest.raises(transforms.DegenerateImageError,
                     match=f'{path} \\(width x height 1x500\\) resizes to '
                     '0x128'):
    Predictor(cfg, None).predict_images([path], progress=False)


# ------------------------------------------------------------ bad files
def test_empty_and_unrecognised_files_are_refused_at_start_up(tmp_path):
  with pytest.raises(coco.CocoFormatError) as e:
    pipeline.build_source(_quickstart_config(_case('coco_zero_byte_val')),
                          train=False)
  assert ('1 of the 2 image files of ' in str(e.value) and
          'are empty (0 bytes): ' in str(e.value) and
          'coco_zero_byte_val/val/000000.png (image 1)' in str(e.value))
  img = np.zeros((32, 32, 3), np.uint8)
  _write_coco(str(tmp_path), 'val', [(1, 'a.png', img), (2, 'b.png', None,
                                                          32, 32)], [])
  (tmp_path / 'val' / 'b.png').write_text('not an image\n')
  with pytest.raises(coco.CocoFormatError,
                     match=r'not in an image format OpenCV can read: .*'
                     r'val/b.png \(image 2\)'):
    coco.CocoSource(str(tmp_path), 'val', train=False)


def _jpeg(path, progressive=False):
  rng = np.random.default_rng(1)
  pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
  Image.fromarray(pixels).save(path, quality=90, progressive=progressive)
  with open(path, 'rb') as f:
    return f.read()


def test_truncated_images_are_corrupt_or_truncated(tmp_path, monkeypatch):
  path = os.path.join(_case('coco_truncated_jpeg'), 'train', '000000.jpg')
  with pytest.raises(image_io.CorruptImageError,
                     match=f'cannot decode image {path}: corrupt or truncated '
                     'JPEG file'):
    image_io.imread(path)
  whole = {'baseline': _jpeg(tmp_path / 'b.jpg'),
           'progressive': _jpeg(tmp_path / 'p.jpg', progressive=True)}
  ok, png = cv2.imencode('.png', np.full((40, 30, 3), 7, np.uint8))
  whole['png'] = png.tobytes()
  for kind, content in whole.items():
    image_io.imfrombytes(content)
    for frac in (0.5, 0.9):
      cut = content[:int(len(content) * frac)]
      assert image_io.truncation(cut), kind
      with pytest.raises(image_io.CorruptImageError,
                         match='corrupt or truncated'):
        image_io.imfrombytes(cut, name=kind)
  # Bytes after the end marker (some cameras write them) are accepted.
  image_io.imfrombytes(whole['baseline'] + b'\x00' * 100)
  assert image_io.truncation(whole['baseline'] + b'\x00' * 100) is None
  # Some OpenCV builds return a partly grey image for a truncated JPEG with
  # only a libjpeg warning: the missing end marker still gives it away.
  monkeypatch.setattr(image_io.cv2, 'imdecode',
                      lambda buf, flag: np.full((48, 64, 3), 128, np.uint8))
  with pytest.raises(image_io.CorruptImageError,
                     match='a JPEG without its end-of-image marker'):
    image_io.imfrombytes(whole['baseline'][:-300], name='x.jpg')
  with pytest.raises(image_io.CorruptImageError, match='without its IEND'):
    image_io.imfrombytes(whole['png'][:-20], name='x.png')
  # Unknown content stays "not an image format".
  monkeypatch.undo()
  with pytest.raises(image_io.ImageReadError, match='not an image format'):
    image_io.imfrombytes(b'hello world', name='x.txt')


def _batches(cfg, src, start, n, workers):
  cfg.data.num_workers = workers
  it = pipeline.make_train_iterator(cfg, src, batch_size_per_host=2, seed=3,
                                    start_step=start, process_index=0,
                                    process_count=1)
  out = []
  for _ in range(n):
    out.append((next(it), it.last_record_indices.copy()))
  it.close()
  return out


def test_bad_training_image_is_replaced_deterministically(caplog):
  caplog.set_level(logging.WARNING)
  cfg = _quickstart_config(_case('coco_truncated_jpeg'),
                           max_bad_image_fraction=0.25, flip_ratio=0.5)
  src = pipeline.build_source(cfg, train=True)  # the headers pass
  assert [r['file_name'] for r in src] == [
      '000000.jpg', '000001.jpg', '000002.jpg', '000003.jpg']
  run = _batches(cfg, src, 0, 6, workers=2)
  plan = pipeline.TrainPlan(np.zeros(4, np.int64), 2, 3)
  replaced = 0
  for step, (batch, used) in enumerate(run):
    planned = plan.batch(step)[2]
    # Image 0 (file 000000.jpg) is replaced by the next of its bucket.
    np.testing.assert_array_equal(used, np.where(planned == 0, 1, planned))
    replaced += int((planned == 0).sum())
    assert batch['image'].shape == (2, 128, 128, 3)
    for k, j in enumerate(used):
      epoch = step // plan.steps_per_epoch
      ex, _ = pipeline.train_example(
          src[int(j)], cfg.data,
          pipeline.flip_decision(3, epoch, int(j), 0.5), (128, 128))
      for key in pipeline.TRAIN_KEYS:
        np.testing.assert_array_equal(batch[key][k], ex[key], err_msg=key)
  assert replaced >= 2
  msgs = _warnings(caplog, pipeline.__name__)
  assert len(msgs) == 1  # once per bad file
  assert ('training: skipped image 1: cannot decode image ' in msgs[0] and
          'coco_truncated_jpeg/train/000000.jpg: corrupt or truncated JPEG'
          in msgs[0] and '000001.jpg (image 2) takes its place' in msgs[0])
  # A resumed run and a run without worker threads see the same batches.
  for other in (_batches(cfg, src, 3, 3, workers=0),
                _batches(cfg, src, 0, 6, workers=0)[3:]):
    for (a, ua), (b, ub) in zip(run[3:], other):
      np.testing.assert_array_equal(ua, ub)
      for key in pipeline.TRAIN_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
  # The default share (0.01 of 4 images: none) stops the run at the batch.
  cfg.data.max_bad_image_fraction = 0.01
  with pytest.raises(UserError) as e:
    _batches(cfg, src, 0, 6, workers=0)
  assert str(e.value).startswith(
      '1 of the 2 images read so far in training are corrupt or truncated (')
  assert 'train/000000.jpg (image 1)' in str(e.value)
  assert 'data.max_bad_image_fraction=0.01 allows 0 of the 4 images' in str(
      e.value)
  cfg.data.max_bad_image_fraction = 1.5
  with pytest.raises(config_lib.ConfigError,
                     match=r'data.max_bad_image_fraction=1.5: must be in '
                     r'\[0, 1\]'):
    config_lib.validate(cfg)


def test_bad_images_share_and_evaluation_skip(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  # 10 training images, 2 of them truncated after their header.
  rng = np.random.default_rng(0)
  images, anns = [], []
  for i in range(10):
    pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    images.append((i + 1, f'{i}.png', pixels))
    anns.append(_ann(i + 1, [[4, 4, 40, 4, 40, 40]], image_id=i + 1))
  _write_coco(str(tmp_path), 'train', images, anns)
  for i in (4, 7):
    p = tmp_path / 'train' / f'{i}.png'
    p.write_bytes(p.read_bytes()[:300])
  cfg = _quickstart_config(tmp_path, max_bad_image_fraction=0.2)
  src = pipeline.build_source(cfg, train=True)
  batches = _batches(cfg, src, 0, 10, workers=0)  # 2 bad of 10 allowed
  used = np.concatenate([u for _, u in batches])
  assert 4 not in used and 7 not in used
  assert len(_warnings(caplog, pipeline.__name__)) == 2
  cfg.data.max_bad_image_fraction = 0.1
  with pytest.raises(UserError, match=r'^2 of the \d+ images read so far in '
                     'training are corrupt or truncated'):
    _batches(cfg, src, 0, 10, workers=0)
  # Evaluation: a bad val image is not evaluated; the others are.
  shutil.copytree(_case('coco_category_no_name'), tmp_path / 'cats')
  bad = tmp_path / 'cats' / 'val' / '000001.png'
  bad.chmod(0o644)
  bad.write_bytes(bad.read_bytes()[:5000])
  caplog.clear()
  cfg = _quickstart_config(tmp_path / 'cats', max_bad_image_fraction=0.5)
  _, predictor, metrics = _evaluate(cfg, tmp_path / 'eval')
  assert predictor.seen == [1]
  assert metrics['segm_mAP'] == 1.0
  with open(tmp_path / 'eval' / 'metrics.json') as f:
    assert json.load(f)['num_images'] == 1
  (msg,) = _warnings(caplog, pipeline.__name__)
  assert ('evaluation: skipped image 2: cannot decode image ' in msg and
          'val/000001.png: corrupt or truncated PNG' in msg and
          'it is not evaluated' in msg)
  cfg.data.max_bad_image_fraction = 0.0
  with pytest.raises(UserError, match='in evaluation are corrupt or '
                     r'truncated \(.*val/000001.png \(image 2\)'):
    _evaluate(cfg, tmp_path / 'eval2')


# ------------------------------------------------ command-line contract
def _train(coco_dir, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore',
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run(
      [sys.executable, 'train.py', '--config',
       'configs/quickstart_synthetic.py', '--config.data.source=coco',
       f'--config.data.coco_dir={coco_dir}',
       '--config.data.train_split=train', '--config.data.val_split=val',
       '--config.train.max_steps=2', f'--workdir={workdir}'],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)


def _saved_steps(workdir):
  ckpt = workdir / 'checkpoints'
  return sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []


def test_cli_bad_files_stop_before_any_step(tmp_path):
  proc = _train(_case('coco_zero_byte_val'), tmp_path / 'z')
  assert_one_error_line(proc, 'are empty (0 bytes)',
                  'coco_zero_byte_val/val/000000.png (image 1)')
  assert not _saved_steps(tmp_path / 'z')
  # All 4 training images are in the first batch of 8: the truncated one
  # is found before the first step; 1 of 4 is more than 0.01 allows.
  proc = _train(_case('coco_truncated_jpeg'), tmp_path / 't')
  assert_one_error_line(proc, 'corrupt or truncated',
                  'coco_truncated_jpeg/train/000000.jpg (image 1)',
                  'data.max_bad_image_fraction=0.01')
  assert 'First step' not in proc.stderr
  assert not _saved_steps(tmp_path / 't')
