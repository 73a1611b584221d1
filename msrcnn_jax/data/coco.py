"""Local COCO instance-segmentation data read with pycocotools.

Directory layout: ``<coco_dir>/annotations/instances_<split>.json`` and the
images in ``<coco_dir>/<split>/``.

Annotation parsing follows mmdetection 2.x ``CocoDataset._parse_ann_info``:
an annotation is dropped when ``ignore`` is set, when its box does not
overlap the image, when ``area <= 0`` or ``w < 1`` or ``h < 1``, or when its
category is not in the category list; crowd annotations (``iscrowd=1``) are
not training targets (mmdetection keeps them as ``gt_bboxes_ignore``, which
MS R-CNN never uses: spec §3.1 item 6). Boxes become ``(x1, y1, x1 + w,
y1 + h)`` float32 in original pixels. Labels 0..N-1 follow the sorted
category ids (``cat2label``).

For training, images without a usable annotation are skipped, and so are
images whose shorter side is below ``min_size`` (mmdetection's
``_filter_imgs(min_size=32)``). mmdetection's ``filter_empty_gt`` only
drops images with no annotation at all, so it still trains on crowd-only
images with empty targets; we skip those too. For evaluation every image
is kept.

A record is a dict::

  image_id (int), file_name (str), path (str), height, width (int),
  boxes (G, 4) float32 original pixels, labels (G,) int32,
  segmentations (list of G COCO segmentations: polygons or RLE)

Masks are decoded on demand by ``decode_masks(record)``; records of other
sources may carry ``masks`` (G, H, W) uint8 directly instead.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils


class CocoFormatError(IOError):
  """A missing or malformed COCO directory / annotation file."""


def annotation_file(coco_dir: str, split: str) -> str:
  return os.path.join(coco_dir, 'annotations', f'instances_{split}.json')


def parse_annotations(anns: Sequence[Mapping[str, Any]], height: int,
                      width: int, cat2label: Mapping[int, int]):
  """mmdetection's ``_parse_ann_info`` for one image.

  Returns:
    (boxes (G, 4) float32 x1,y1,x2,y2, labels (G,) int32, segmentations
    list of G, crowd_boxes (K, 4) float32).
  """
  boxes, labels, segs, crowd = [], [], [], []
  for ann in anns:
    if ann.get('ignore', False):
      continue
    x1, y1, w, h = ann['bbox']
    inter_w = max(0, min(x1 + w, width) - max(x1, 0))
    inter_h = max(0, min(y1 + h, height) - max(y1, 0))
    if inter_w * inter_h == 0:
      continue
    if ann['area'] <= 0 or w < 1 or h < 1:
      continue
    if ann['category_id'] not in cat2label:
      continue
    box = [x1, y1, x1 + w, y1 + h]
    if ann.get('iscrowd', False):
      crowd.append(box)
    else:
      boxes.append(box)
      labels.append(cat2label[ann['category_id']])
      segs.append(ann.get('segmentation'))
  return (np.array(boxes, np.float32).reshape(-1, 4),
          np.array(labels, np.int32), segs,
          np.array(crowd, np.float32).reshape(-1, 4))


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
  """A COCO segmentation (polygons, RLE or compressed RLE) -> (H, W) uint8.

  Same as pycocotools ``COCO.annToMask`` and mmdetection's ``_poly2mask``.
  """
  if isinstance(seg, list):  # polygons
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
  elif isinstance(seg.get('counts'), list):  # uncompressed RLE
    rle = mask_utils.frPyObjects(seg, height, width)
  else:
    rle = dict(seg)
    if isinstance(rle['counts'], str):
      rle['counts'] = rle['counts'].encode('ascii')
  return mask_utils.decode(rle).astype(np.uint8)


def decode_masks(record: Mapping[str, Any]) -> np.ndarray:
  """The ``(G, H, W)`` uint8 {0, 1} instance bitmaps of a record."""
  masks = record.get('masks')
  if masks is not None:
    return masks
  h, w = int(record['height']), int(record['width'])
  segs = record.get('segmentations') or []
  if not segs:
    return np.zeros((0, h, w), np.uint8)
  return np.stack([segmentation_to_mask(s, h, w) for s in segs])


class CocoSource:
  """Records of one split of a local COCO directory.

  Args:
    coco_dir: dataset root.
    split: e.g. 'train2017' (annotation file ``instances_<split>.json``,
      images in ``<coco_dir>/<split>/``).
    train: skip images without usable annotations or below ``min_size``.
    min_size: minimum shorter image side for training (mmdetection 32).

  Attributes:
    records: list of record dicts (see module docstring).
    cat_ids: sorted category ids; label i <-> cat_ids[i].
    class_names: category names in label order.
    coco: the ``pycocotools.coco.COCO`` object (for evaluation).
    ann_file: the annotation file path.
  """

  def __init__(self, coco_dir: str, split: str, train: bool,
               min_size: int = 32):
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    if not coco_dir or not os.path.isdir(coco_dir):
      raise CocoFormatError(f'COCO directory not found: {coco_dir!r}')
    self.ann_file = annotation_file(coco_dir, split)
    if not os.path.isfile(self.ann_file):
      raise CocoFormatError(
          f'annotation file not found: {self.ann_file} (expected '
          f'<coco_dir>/annotations/instances_<split>.json)')
    self.image_dir = os.path.join(coco_dir, split)
    if not os.path.isdir(self.image_dir):
      raise CocoFormatError(f'image directory not found: {self.image_dir}')
    try:
      self.coco = COCO(self.ann_file)
    except Exception as e:  # json errors, missing keys
      raise CocoFormatError(f'cannot parse {self.ann_file}: {e!r}') from e
    self.split = split
    self.train = train
    self.cat_ids = tuple(sorted(self.coco.getCatIds()))
    cats = self.coco.loadCats(list(self.cat_ids))
    self.class_names = tuple(c['name'] for c in cats)
    cat2label = {c: i for i, c in enumerate(self.cat_ids)}
    self.records = []
    self.num_skipped = 0
    for img_id in self.coco.getImgIds():
      info = self.coco.imgs[img_id]
      h, w = int(info['height']), int(info['width'])
      anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id]))
      boxes, labels, segs, _ = parse_annotations(anns, h, w, cat2label)
      if train and (len(labels) == 0 or min(h, w) < min_size):
        self.num_skipped += 1
        continue
      self.records.append(dict(
          image_id=int(img_id), file_name=info['file_name'],
          path=os.path.join(self.image_dir, info['file_name']),
          height=h, width=w, boxes=boxes, labels=labels,
          segmentations=segs))

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return dict(self.records[i])

  def image_sizes(self) -> np.ndarray:
    """``(N, 2)`` int (height, width) of every record."""
    return np.array([[r['height'], r['width']] for r in self.records],
                    np.int64).reshape(-1, 2)
