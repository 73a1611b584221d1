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

Malformed input (``load_coco``, ``check_image_files``) is handled as
detectron2's ``load_coco_json`` and mmdetection 2.x's ``LoadAnnotations``
handle it where they agree, and refused where they crash late:

- A polygon part with fewer than 3 points (under 6 numbers), an odd number
  of coordinates or a non-finite one is dropped (both libraries keep only
  parts of even length >= 6); an annotation left without a valid part, or
  without a segmentation, or with an RLE of another size than its image is
  skipped (detectron2 skips it and counts it; mmdetection crashes in
  pycocotools, mmdetection#7776). One warning per kind counts them and names
  annotation and image ids. Evaluation uses the cleaned file as ground
  truth, so pycocotools' COCOeval does not crash on it either.
- A missing ``area`` is computed from the mask with pycocotools
  (``mask.area``, as ``COCO.loadRes`` computes it for results); mmdetection
  raises ``KeyError: 'area'`` (mmdetection#4436). A missing ``iscrowd`` is
  0, as mmdetection reads it.
- Annotations whose category is not in ``categories`` are ignored, as
  mmdetection ignores them, with a counted warning (detectron2 raises).
- Refused before any work, with one ``CocoFormatError`` naming the file
  and ids: an unreadable file, an empty image list, an image or annotation
  entry without its required keys, a training split without a usable
  annotation, missing image files, and files whose decoded size (EXIF
  orientation applied, as OpenCV and mmcv decode them) is not the
  annotated width/height (detectron2's ``SizeMismatchError``, which it
  raises only when the image is loaded).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from msrcnn_jax.data import image_io
from msrcnn_jax.errors import UserError

logger = logging.getLogger(__name__)

_IDS_NAMED = 10  # at most this many ids in one message


class CocoFormatError(UserError, IOError):
  """A missing or malformed COCO directory, annotation file or image file."""


def _listing(items: Sequence[str]) -> str:
  """The first ``_IDS_NAMED`` items, comma separated, and how many more."""
  more = len(items) - _IDS_NAMED
  return ', '.join(items[:_IDS_NAMED]) + (f' and {more} more' if more > 0
                                          else '')


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


def segmentation_to_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
  """A valid COCO segmentation (polygons, RLE or compressed RLE) -> the
  compressed RLE of its ``(height, width)`` mask (pycocotools
  ``COCO.annToRLE``; polygon parts are merged)."""
  if isinstance(seg, list):  # polygons
    return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
  if isinstance(seg.get('counts'), list):  # uncompressed RLE
    return mask_utils.frPyObjects(seg, height, width)
  rle = dict(seg)
  if isinstance(rle['counts'], str):
    rle['counts'] = rle['counts'].encode('ascii')
  return rle


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
  """A COCO segmentation (polygons, RLE or compressed RLE) -> (H, W) uint8.

  Same as pycocotools ``COCO.annToMask`` and mmdetection's ``_poly2mask``.
  """
  return mask_utils.decode(segmentation_to_rle(seg, height, width)).astype(
      np.uint8)


def _valid_polygon_part(part: Any) -> bool:
  """At least 3 points, an even number of finite coordinates."""
  if not isinstance(part, (list, tuple)) or len(part) < 6 or len(part) % 2:
    return False
  try:
    return bool(np.isfinite(np.asarray(part, np.float64)).all())
  except (TypeError, ValueError):
    return False


def _valid_rle(seg: Mapping[str, Any], height: int, width: int) -> bool:
  """An RLE of the image's size (uncompressed counts must cover it)."""
  try:
    if [int(v) for v in seg['size']] != [height, width]:
      return False
  except (KeyError, TypeError, ValueError):
    return False
  counts = seg.get('counts')
  if isinstance(counts, list):
    return all(isinstance(c, int) and c >= 0 for c in counts) and (
        sum(counts) == height * width)
  return isinstance(counts, (str, bytes))


def clean_segmentation(seg: Any, height: int, width: int
                       ) -> tuple[Any, int]:
  """Drops the invalid parts of a COCO segmentation.

  Args:
    seg: polygons (a list of ``[x1, y1, x2, y2, ...]`` parts) or an RLE
      dict (``size`` [h, w], ``counts`` a list or a compressed string).
    height, width: the image's size.

  Returns:
    ``(segmentation, parts dropped)``: polygons keep only their parts with
    at least 3 points, an even count and finite numbers; the segmentation
    is None when nothing valid is left, or when it is missing, of another
    type, or an RLE of another size.
  """
  if isinstance(seg, list):
    parts = [p for p in seg if _valid_polygon_part(p)]
    return (parts or None), len(seg) - len(parts)
  if isinstance(seg, Mapping) and _valid_rle(seg, height, width):
    return seg, 0
  return None, 0


def clean_dataset(dataset: Any, ann_file: str) -> dict[str, Any]:
  """Checks and cleans a loaded COCO instances file in place.

  See the module docstring for what is dropped, computed and refused.

  Args:
    dataset: the parsed JSON.
    ann_file: its path, for messages.

  Returns:
    ``dataset``, with the invalid polygon parts and the annotations without
    a valid segmentation removed, and ``area`` / ``iscrowd`` filled in.

  Raises:
    CocoFormatError: not a COCO instances file, no images, or an image or
      annotation entry without its required keys.
  """
  if not isinstance(dataset, dict) or not isinstance(dataset.get('images'),
                                                     list):
    raise CocoFormatError(f'{ann_file} is not a COCO instances file: it has '
                          'no "images" list')
  if not dataset['images']:
    raise CocoFormatError(f'{ann_file} lists no images ("images": [])')
  sizes = {}
  for i, img in enumerate(dataset['images']):
    try:
      sizes[img['id']] = (int(img['height']), int(img['width']))
      str(img['file_name'])
    except (KeyError, TypeError, ValueError) as e:
      raise CocoFormatError(
          f'{ann_file}: image entry {i} ({img!r:.120}) needs an id, a '
          f'file_name and integer height and width ({e!r})') from e
  cat_ids = set()
  for c in dataset.setdefault('categories', []):
    if not isinstance(c, Mapping) or 'id' not in c:
      raise CocoFormatError(f'{ann_file}: category entry {c!r:.120} has no '
                            'id')
    cat_ids.add(c['id'])
  kept, bad_parts, skipped, no_area, unknown_cat = [], [], [], [], []
  num_bad_parts = 0
  for i, ann in enumerate(dataset.setdefault('annotations', [])):
    missing = [k for k in ('id', 'image_id', 'category_id', 'bbox')
               if not isinstance(ann, Mapping) or k not in ann]
    if missing:
      raise CocoFormatError(
          f'{ann_file}: annotation entry {i} ({ann!r:.120}) has no '
          f'{", ".join(missing)}')
    where = f'annotation {ann["id"]} (image {ann["image_id"]})'
    bbox = ann['bbox']
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and
            all(isinstance(v, (int, float)) and np.isfinite(v)
                for v in bbox)):
      raise CocoFormatError(f'{ann_file}: {where} has bbox {bbox!r}; '
                            'expected [x, y, width, height]')
    hw = sizes.get(ann['image_id'])
    if hw is None:
      skipped.append(f'{where}: no such image')
      continue
    raw = ann.get('segmentation')
    seg, n_bad = clean_segmentation(raw, *hw)
    if seg is None:
      skipped.append(f'{where}: ' + (
          f'none of its {len(raw)} polygon part(s) valid'
          if isinstance(raw, list) and raw else
          f'RLE not of the image size {list(hw)}'
          if isinstance(raw, Mapping) else 'no segmentation'))
      continue
    if n_bad:
      bad_parts.append(where)
      num_bad_parts += n_bad
    ann['segmentation'] = seg
    ann.setdefault('iscrowd', 0)
    if ann.get('area') is None:
      ann['area'] = float(mask_utils.area(segmentation_to_rle(seg, *hw)))
      no_area.append(where)
    if ann['category_id'] not in cat_ids:
      unknown_cat.append(where)
    kept.append(ann)
  dataset['annotations'] = kept
  invalid = ('(a valid polygon part has at least 3 points: an even number, '
             '>= 6, of finite coordinates)')
  if bad_parts:
    logger.warning(
        '%s: dropped %d invalid polygon part(s) from %d annotation(s) %s: %s',
        ann_file, num_bad_parts, len(bad_parts), invalid,
        _listing(bad_parts))
  if skipped:
    logger.warning(
        '%s: skipped %d annotation(s) without a valid segmentation %s: %s',
        ann_file, len(skipped), invalid, _listing(skipped))
  if no_area:
    logger.warning(
        '%s: %d annotation(s) have no "area"; computed it from the mask '
        '(pycocotools mask.area): %s', ann_file, len(no_area),
        _listing(no_area))
  if unknown_cat:
    logger.warning(
        '%s: %d annotation(s) have a category_id that "categories" does not '
        'list (%s), and are ignored: %s', ann_file, len(unknown_cat),
        sorted({a['category_id'] for a in kept} - cat_ids, key=str),
        _listing(unknown_cat))
  return dataset


def load_coco(ann_file: str):
  """The pycocotools ``COCO`` of an annotation file, checked and cleaned.

  Raises:
    CocoFormatError: a missing or unparsable file, or what
      ``clean_dataset`` refuses.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(ann_file):
    raise CocoFormatError(
        f'annotation file not found: {ann_file} (expected '
        '<coco_dir>/annotations/instances_<split>.json)')
  try:
    with open(ann_file) as f:
      dataset = json.load(f)
  except (OSError, ValueError) as e:  # json and unicode errors
    raise CocoFormatError(f'cannot parse {ann_file}: {e}') from e
  coco = COCO()
  coco.dataset = clean_dataset(dataset, ann_file)
  coco.createIndex()
  return coco


def check_trainable(records: Sequence[Any], coco, where: str,
                    min_size: int) -> None:
  """Refuses a training split without a usable annotation.

  Args:
    records: the training records kept.
    coco: the split's (cleaned) pycocotools ``COCO``.
    where: the annotation file (or dataset) for the message.
    min_size: the shorter-side limit the records were filtered with.
  """
  if len(records):
    return
  ids = [str(i) for i in coco.getImgIds()]
  raise CocoFormatError(
      f'no usable training annotation in {where}: its {len(ids)} image(s) '
      f'(ids {_listing(ids)}) have {len(coco.anns)} annotation(s) with a '
      'valid segmentation; training needs an image with a shorter side >= '
      f'{min_size} and a non-crowd annotation of a listed category whose '
      'box (at least 1x1) overlaps the image, with area > 0')


def check_image_files(records: Sequence[Mapping[str, Any]],
                      ann_file: str) -> None:
  """Refuses missing image files and files that decode to another size.

  Reads only file headers (``image_io.displayed_size``): 0.04 (PNG) to 0.1
  (JPEG) ms of CPU per image, about 12 s for COCO train2017
  (BENCHMARKS.md).

  Args:
    records: dicts with ``image_id``, ``path``, ``height`` and ``width``.
    ann_file: the annotation file, for the message.

  Raises:
    CocoFormatError: naming the files and image ids.
  """
  missing = [f'{r["path"]} (image {r["image_id"]})' for r in records
             if not os.path.isfile(r['path'])]
  if missing:
    raise CocoFormatError(
        f'{len(missing)} of the {len(records)} image files of {ann_file} are '
        f'missing: {_listing(missing)}')
  wrong = []
  for r in records:
    size = image_io.displayed_size(r['path'])
    expected = (int(r['height']), int(r['width']))
    if size is not None and size[0] != expected:
      wrong.append(image_io.size_mismatch_message(
          f'{r["path"]} (image {r["image_id"]})', expected, *size))
  if wrong:
    more = f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''
    raise CocoFormatError(
        f'{len(wrong)} image(s) of {ann_file} do not have their annotated '
        f'size: {"; ".join(wrong[:3])}{more}')


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
    coco: the cleaned ``pycocotools.coco.COCO`` (``load_coco``), the
      evaluation ground truth.
    ann_file: the annotation file path.

  Raises:
    CocoFormatError: before any image is decoded, for what ``load_coco``,
      ``check_trainable`` (training only) and ``check_image_files`` (the
      records kept) refuse.
  """

  def __init__(self, coco_dir: str, split: str, train: bool,
               min_size: int = 32):
    if not coco_dir or not os.path.isdir(coco_dir):
      raise CocoFormatError(f'COCO directory not found: {coco_dir!r}')
    self.ann_file = annotation_file(coco_dir, split)
    self.image_dir = os.path.join(coco_dir, split)
    self.coco = load_coco(self.ann_file)
    if not os.path.isdir(self.image_dir):
      raise CocoFormatError(f'image directory not found: {self.image_dir}')
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
    if train:
      check_trainable(self.records, self.coco, self.ann_file, min_size)
    check_image_files(self.records, self.ann_file)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return dict(self.records[i])

  def image_sizes(self) -> np.ndarray:
    """``(N, 2)`` int (height, width) of every record."""
    return np.array([[r['height'], r['width']] for r in self.records],
                    np.int64).reshape(-1, 2)
