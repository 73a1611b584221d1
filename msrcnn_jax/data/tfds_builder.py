"""TFDS dataset ``coco_instance_masks`` built from a local COCO directory.

The builder reads ``<manual_dir>/annotations/instances_<split>.json`` and
``<manual_dir>/<split>/`` for every annotation file it finds (one TFDS split
per COCO split, same name). Each example stores the image file's *encoded
bytes* unchanged (decoded later with cv2 exactly as mmdetection does, see
``image_io``) and every annotation unfiltered: raw COCO ``bbox`` [x, y, w, h]
(float64, so that ``x1 + w`` is computed as mmdetection computes it),
``area``, ``category_id``, ``label`` (index in the sorted category ids),
``is_crowd``, ``ignore`` and the instance mask as a compressed COCO RLE
string (polygons are converted with pycocotools ``frPyObjects`` + ``merge``,
the same bitmaps ``annToMask`` gives). The annotation file is read with
``coco.load_coco`` (invalid polygon parts dropped, missing areas computed,
malformed files refused) and the image files checked with
``coco.check_image_files`` before the first example; mmdetection's
filtering is applied when reading (``TfdsSource``), by
``coco.parse_annotations``.

TensorFlow / tensorflow_datasets are imported lazily (the ``tfds`` extra):
``CocoInstanceMasks`` is created on first access.

Build::

  from msrcnn_jax.data import tfds_builder
  tfds_builder.prepare('/data/coco', data_dir='/data/tfds')

Read: ``TfdsSource(data_dir, 'val2017', train=False)`` gives records like
``coco.CocoSource`` (with ``image_bytes`` instead of ``path``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
from typing import Any

import numpy as np

from msrcnn_jax.data import coco as coco_lib
from msrcnn_jax.errors import UserError

NAME = 'coco_instance_masks'
VERSION = '1.0.0'
FILE_FORMAT = 'array_record'  # random access for the pipeline


def _segmentation_rle(seg: Any, height: int, width: int) -> bytes:
  """Compressed RLE counts of a (cleaned) COCO segmentation."""
  counts = coco_lib.segmentation_to_rle(seg, height, width)['counts']
  return counts.encode('ascii') if isinstance(counts, str) else counts


def coco_splits(manual_dir: str) -> list[str]:
  """COCO split names with an annotation file under ``manual_dir``."""
  files = glob.glob(os.path.join(manual_dir, 'annotations', 'instances_*.json'))
  return sorted(re.sub(r'^instances_|\.json$', '', os.path.basename(f))
                for f in files)


@functools.lru_cache(maxsize=None)
def _builder_class():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CocoInstanceMasks(tfds.core.GeneratorBasedBuilder):
    """COCO-format instance segmentation from a local directory."""

    name = NAME
    RELEASE_NOTES = {VERSION: 'Encoded images, raw boxes, RLE masks.'}
    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Point manual_dir at a COCO directory: annotations/instances_<split>'
        '.json and <split>/ image folders.')
    # No download URLs and no checksums file. (Shadowing the class
    # properties also avoids tfds' optional importlib_resources import.)
    code_path = None
    url_infos = None

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              'image_id': np.int64,
              'file_name': tfds.features.Text(),
              'image_bytes': tfds.features.Tensor(shape=(), dtype=tf.string),
              'height': np.int32,
              'width': np.int32,
              'objects': tfds.features.Sequence({
                  'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float64),
                  'area': np.float64,
                  'category_id': np.int64,
                  'label': np.int64,
                  'is_crowd': np.bool_,
                  'ignore': np.bool_,
                  'mask_rle': tfds.features.Tensor(shape=(), dtype=tf.string),
              }),
          }),
          metadata=tfds.core.MetadataDict(),
          disable_shuffling=True,  # keep the annotation file's image order
          homepage='https://cocodataset.org',
      )

    def _split_generators(self, dl_manager):
      manual_dir = os.fspath(dl_manager.manual_dir)
      splits = coco_splits(manual_dir)
      if not splits:
        raise coco_lib.CocoFormatError(
            f'no annotations/instances_<split>.json under {manual_dir}')
      cats = None
      for s in splits:
        with open(coco_lib.annotation_file(manual_dir, s)) as f:
          c = sorted(json.load(f)['categories'], key=lambda c: c['id'])
        cats = cats or c
      self.info.metadata['categories'] = [
          dict(id=int(c['id']), name=c.get('name') or f'category {c["id"]}')
          for c in cats]
      return {s: self._generate_examples(manual_dir, s) for s in splits}

    def _generate_examples(self, manual_dir, split):
      ann_file = coco_lib.annotation_file(manual_dir, split)
      coco = coco_lib.load_coco(ann_file)
      coco_lib.check_image_files(
          [dict(image_id=i, height=im['height'], width=im['width'],
                path=os.path.join(manual_dir, split, im['file_name']))
           for i, im in coco.imgs.items()], ann_file)
      cat_ids = sorted(coco.getCatIds())
      cat2label = {c: i for i, c in enumerate(cat_ids)}
      for img_id in coco.getImgIds():
        info = coco.imgs[img_id]
        h, w = int(info['height']), int(info['width'])
        path = os.path.join(manual_dir, split, info['file_name'])
        with open(path, 'rb') as f:
          content = f.read()
        objects = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
          objects.append(dict(
              bbox=np.asarray(ann['bbox'], np.float64),
              area=float(ann['area']),
              category_id=int(ann['category_id']),
              label=int(cat2label.get(ann['category_id'], -1)),
              is_crowd=bool(ann.get('iscrowd', 0)),
              ignore=bool(ann.get('ignore', False)),
              mask_rle=_segmentation_rle(ann['segmentation'], h, w)))
        yield int(img_id), dict(
            image_id=int(img_id), file_name=info['file_name'],
            image_bytes=content, height=h, width=w, objects=objects)

  return CocoInstanceMasks


def __getattr__(name):  # PEP 562: lazy TensorFlow import
  if name == 'CocoInstanceMasks':
    return _builder_class()
  raise AttributeError(name)


def prepare(manual_dir: str, data_dir: str, file_format: str = FILE_FORMAT):
  """Builds ``coco_instance_masks`` from ``manual_dir`` into ``data_dir``.

  Returns:
    The prepared builder.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(manual_dir):
    raise coco_lib.CocoFormatError(f'COCO directory not found: {manual_dir}')
  builder = _builder_class()(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _example_to_record(ex, h, w):
  """A TFDS example (numpy) -> (record without bytes, objects as COCO anns)."""
  obj = ex['objects']
  anns = []
  for k in range(len(obj['label'])):
    rle = obj['mask_rle'][k]
    anns.append(dict(
        bbox=[float(v) for v in obj['bbox'][k]], area=float(obj['area'][k]),
        category_id=int(obj['category_id'][k]),
        iscrowd=int(obj['is_crowd'][k]), ignore=bool(obj['ignore'][k]),
        segmentation=dict(size=[h, w], counts=rle.decode('ascii')
                          if isinstance(rle, bytes) else str(rle))))
  return anns


class TfdsSource:
  """Records of one split of a prepared ``coco_instance_masks`` dataset.

  Same record format and filtering as ``coco.CocoSource``; ``path`` is None
  and ``__getitem__`` adds ``image_bytes`` (random access through
  ``as_data_source`` when the dataset was built as array_record, else all
  examples are held in memory).

  Args:
    data_dir: the TFDS data_dir given to ``prepare``.
    split: split name (as in the COCO directory).
    train: skip images without usable annotations or below ``min_size``.
    name: dataset name (``coco_instance_masks``).
    min_size: minimum shorter side for training (mmdetection 32).
  """

  def __init__(self, data_dir: str, split: str, train: bool,
               name: str = NAME, min_size: int = 32):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    cls = _builder_class()
    if name != NAME:
      raise UserError(f'unknown TFDS dataset {name!r}; expected {NAME!r}')
    if not data_dir or not os.path.isdir(os.path.join(data_dir, NAME)):
      raise UserError(
          f'no prepared {NAME} dataset under data_dir={data_dir!r}; build it '
          'with msrcnn_jax.data.tfds_builder.prepare(coco_dir, data_dir)')
    self.builder = cls(data_dir=data_dir)
    if split not in self.builder.info.splits:
      raise UserError(
          f'split {split!r} not in {list(self.builder.info.splits)}')
    cats = self.builder.info.metadata.get('categories', [])
    self.cat_ids = tuple(int(c['id']) for c in cats)
    self.class_names = tuple(c['name'] for c in cats)
    cat2label = {c: i for i, c in enumerate(self.cat_ids)}
    try:
      self._examples = self.builder.as_data_source(split)
    except Exception:  # pylint: disable=broad-except  # not array_record
      self._examples = list(tfds.as_numpy(self.builder.as_dataset(split)))
    self.records = []
    self._images, self._anns = [], []
    self._coco = None
    for i in range(len(self._examples)):
      ex = self._examples[i]
      h, w = int(ex['height']), int(ex['width'])
      anns = _example_to_record(ex, h, w)
      fname = ex['file_name']
      fname = fname.decode() if isinstance(fname, bytes) else fname
      self._images.append(dict(id=int(ex['image_id']), file_name=fname,
                               height=h, width=w))
      for a in anns:
        self._anns.append(dict(a, id=len(self._anns) + 1,
                               image_id=int(ex['image_id'])))
      boxes, labels, segs, _ = coco_lib.parse_annotations(
          anns, h, w, cat2label)
      if train and (len(labels) == 0 or min(h, w) < min_size):
        continue
      self.records.append(dict(
          image_id=int(ex['image_id']), file_name=fname,
          path=None, height=h, width=w, boxes=boxes, labels=labels,
          segmentations=segs, _index=i))
    if train:
      coco_lib.check_trainable(self.records, self.coco,
                               f'{NAME} split {split!r} in {data_dir}',
                               min_size)

  @property
  def coco(self):
    """pycocotools ``COCO`` ground truth of the whole split (crowd
    annotations included, as the original annotation file), for evaluation.
    """
    if self._coco is None:
      from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
      coco = COCO()
      coco.dataset = dict(
          images=list(self._images), annotations=list(self._anns),
          categories=[dict(id=c, name=n) for c, n in
                      zip(self.cat_ids, self.class_names)])
      coco.createIndex()
      self._coco = coco
    return self._coco

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    rec = dict(self.records[i])
    rec['image_bytes'] = self._examples[rec.pop('_index')]['image_bytes']
    return rec

  def image_sizes(self) -> np.ndarray:
    return np.array([[r['height'], r['width']] for r in self.records],
                    np.int64).reshape(-1, 2)
