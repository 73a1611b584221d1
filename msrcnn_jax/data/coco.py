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
  without a segmentation, or with an RLE that cannot be decoded as its
  image's mask (another size; counts, compressed or not, that are not a
  valid COCO RLE string, hold a negative run or do not sum to h * w:
  ``rle_problem``) is skipped, never decoded (detectron2 skips it and
  counts it; mmdetection crashes in pycocotools, mmdetection#7776, or
  trains on a mask pycocotools decodes from uninitialised memory). One
  warning per kind counts them and names annotation and image ids.
  Evaluation uses the cleaned file as ground truth, so pycocotools'
  COCOeval does not crash on it either.
- A category without a ``name`` is named from the config
  (``fill_category_names``) with a warning; neither training nor
  evaluation needs the name.
- A missing ``area`` is computed from the mask with pycocotools
  (``mask.area``, as ``COCO.loadRes`` computes it for results); mmdetection
  raises ``KeyError: 'area'`` (mmdetection#4436). A missing ``iscrowd`` is
  0, as mmdetection reads it.
- Annotations whose category is not in ``categories`` are ignored, as
  mmdetection ignores them, with a counted warning (detectron2 raises).
- Refused before any work, with one ``CocoFormatError`` naming the file
  and ids: an unreadable file, an empty image list, an image or annotation
  entry without its required keys, an image height or width below 1, an
  image id used by two images (naming both files: pycocotools would pair
  one image's annotations with the other's pixels) or an annotation id used
  twice, a training split without a usable annotation, missing, empty (0
  bytes) or unrecognised image files, and files whose decoded size (EXIF
  orientation applied, as OpenCV and mmcv decode them) is not the
  annotated width/height (detectron2's ``SizeMismatchError``, which it
  raises only when the image is loaded).
"""

from __future__ import annotations

import contextlib
import io
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


def rle_string_counts(counts: str | bytes) -> np.ndarray | None:
  """The run lengths of a compressed COCO RLE string, or None if invalid.

  pycocotools' ``rleFrString`` (maskApi.c): each run is a little-endian
  base-32 number, 5 bits per character ``chr(48 + bits)`` with 0x20 set on
  every character but its last and 0x10 of the last one its sign; from the
  fourth run on, a run is stored as its difference to the run two before.
  ``rleFrString`` accepts any string (it reads past the end of one that
  stops mid-number), so a string is valid here only when every character
  is in ``'0'..'o'``, the last one ends a number and no number has more
  than 6 characters (30 bits: |value| < 2**29, where pycocotools' int
  arithmetic is exact; images up to 536M pixels).

  Args:
    counts: the ``counts`` of a compressed RLE (ASCII).

  Returns:
    ``(R,)`` int64 run lengths (may be negative: the caller checks), or None
    when the string is not a COCO RLE string (or a run reaches 2**32).
  """
  if isinstance(counts, str):
    try:
      counts = counts.encode('ascii')
    except UnicodeEncodeError:
      return None
  c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
  if not len(c) or c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
    return None
  ends = np.flatnonzero((c & 0x20) == 0)
  starts = np.concatenate([[0], ends[:-1] + 1])
  digits = ends - starts + 1
  if digits.max() > 6:  # pycocotools' int shifts overflow past 30 bits
    return None
  k = np.arange(len(c)) - np.repeat(starts, digits)
  x = np.add.reduceat((c & 0x1f) << (5 * k), starts)
  x = np.where(c[ends] & 0x10, x - (np.int64(1) << (5 * digits)), x)
  runs = x.copy()
  runs[1::2] = np.cumsum(x[1::2])  # run m > 2 adds run m - 2
  runs[2::2] = np.cumsum(x[2::2])
  if runs.max() >= 2**32:
    return None
  return runs


def rle_problem(seg: Mapping[str, Any], height: int, width: int
                ) -> str | None:
  """Why an RLE segmentation cannot be decoded as a ``(height, width)``
  mask, or None when it can.

  An RLE must have the image's ``size`` [h, w] and ``counts`` (a list of
  ints, or a compressed string, see ``rle_string_counts``) of non-negative
  runs that sum to h * w. pycocotools decodes shorter counts from
  uninitialised memory and writes longer ones past its buffer; it never
  checks them.
  """
  try:
    size = [int(v) for v in seg['size']]
  except (KeyError, TypeError, ValueError):
    return f'RLE without a [height, width] "size" ({seg.get("size")!r:.40})'
  if size != [height, width]:
    return f'RLE not of the image size {[height, width]} (size {size})'
  counts = seg.get('counts')
  if isinstance(counts, list):
    if not all(isinstance(v, int) and not isinstance(v, bool)
               for v in counts):
      return 'RLE counts with a value that is not an integer'
    runs = counts
  elif isinstance(counts, (str, bytes)):
    runs = rle_string_counts(counts)
    if runs is None:
      return (f'RLE counts {counts!r:.40} not a valid COCO RLE string '
              '(pycocotools mask.encode)')
  else:
    return f'RLE counts of type {type(counts).__name__}'
  try:
    runs = np.asarray(runs, np.int64)
  except OverflowError:
    return 'RLE counts with a run length beyond 64 bits'
  if len(runs) and runs.min() < 0:
    return 'RLE counts with a negative run length'
  total = int(runs.sum())
  if total != height * width:
    return (f'RLE counts summing to {total}, not height x width = '
            f'{height * width}')
  return None


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
    type, or an RLE that ``rle_problem`` refuses (never decoded).
  """
  if isinstance(seg, list):
    parts = [p for p in seg if _valid_polygon_part(p)]
    return (parts or None), len(seg) - len(parts)
  if isinstance(seg, Mapping) and rle_problem(seg, height, width) is None:
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
  sizes, file_names = {}, {}
  for i, img in enumerate(dataset['images']):
    try:
      hw = (int(img['height']), int(img['width']))
      name = str(img['file_name'])
      img_id = img['id']
      hash(img_id)
    except (KeyError, TypeError, ValueError) as e:
      raise CocoFormatError(
          f'{ann_file}: image entry {i} ({img!r:.120}) needs an id, a '
          f'file_name and integer height and width ({e!r})') from e
    if min(hw) < 1:
      raise CocoFormatError(
          f'{ann_file}: image {img_id} ({name}) has height x width '
          f'{hw[0]}x{hw[1]}; both must be at least 1')
    if img_id in sizes:
      raise CocoFormatError(
          f'{ann_file}: image id {img_id!r} is used twice, by '
          f'{file_names[img_id]} and by {name}; every image needs its own '
          'id (annotations are paired with images by id)')
    sizes[img_id], file_names[img_id] = hw, name
  cat_ids = set()
  for c in dataset.setdefault('categories', []):
    if not isinstance(c, Mapping) or 'id' not in c:
      raise CocoFormatError(f'{ann_file}: category entry {c!r:.120} has no '
                            'id')
    cat_ids.add(c['id'])
  kept, bad_parts, skipped, no_area, unknown_cat = [], [], [], [], []
  num_bad_parts = 0
  first_entry = {}  # annotation id -> its entry index
  for i, ann in enumerate(dataset.setdefault('annotations', [])):
    missing = [k for k in ('id', 'image_id', 'category_id', 'bbox')
               if not isinstance(ann, Mapping) or k not in ann]
    if missing:
      raise CocoFormatError(
          f'{ann_file}: annotation entry {i} ({ann!r:.120}) has no '
          f'{", ".join(missing)}')
    try:
      j = first_entry.setdefault(ann['id'], i)
    except TypeError as e:  # unhashable
      raise CocoFormatError(f'{ann_file}: annotation entry {i} has id '
                            f'{ann["id"]!r:.60}; expected an integer') from e
    if j != i:
      other = dataset['annotations'][j]
      raise CocoFormatError(
          f'{ann_file}: annotation id {ann["id"]!r} is used twice (entries '
          f'{j} and {i}, on images {other["image_id"]!r} and '
          f'{ann["image_id"]!r}); every annotation needs its own id')
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
          rle_problem(raw, *hw)
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
        '%s: skipped %d annotation(s) without a valid segmentation%s: %s',
        ann_file, len(skipped),
        ' ' + invalid if any('polygon' in k for k in skipped) else '',
        _listing(skipped))
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
  with contextlib.redirect_stdout(io.StringIO()):  # 'creating index...'
    coco.createIndex()
  logging.info('%s: %d images, %d annotations, %d categories', ann_file,
               len(coco.imgs), len(coco.anns), len(coco.cats))
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
  """Refuses missing, empty and unrecognised image files, and files that
  decode to another size.

  Reads only file sizes and headers (``image_io.displayed_size``, else
  OpenCV's signature check ``cv2.haveImageReader``): 0.04 (PNG) to 0.1
  (JPEG) ms of CPU per image, about 12 s for COCO train2017
  (BENCHMARKS.md). A file whose header is valid but whose data is corrupt
  or truncated is found when it is decoded (``data.pipeline`` skips it).

  Args:
    records: dicts with ``image_id``, ``path``, ``height`` and ``width``.
    ann_file: the annotation file, for the message.

  Raises:
    CocoFormatError: naming the files and image ids.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  named = lambda r: f'{r["path"]} (image {r["image_id"]})'
  missing = [named(r) for r in records if not os.path.isfile(r['path'])]
  if missing:
    raise CocoFormatError(
        f'{len(missing)} of the {len(records)} image files of {ann_file} are '
        f'missing: {_listing(missing)}')
  empty = [named(r) for r in records if os.path.getsize(r['path']) == 0]
  if empty:
    raise CocoFormatError(
        f'{len(empty)} of the {len(records)} image files of {ann_file} are '
        f'empty (0 bytes): {_listing(empty)}')
  wrong, unknown = [], []
  for r in records:
    size = image_io.displayed_size(r['path'])
    expected = (int(r['height']), int(r['width']))
    if size is None and not cv2.haveImageReader(r['path']):
      unknown.append(named(r))
    elif size is not None and size[0] != expected:
      wrong.append(image_io.size_mismatch_message(named(r), expected, *size))
  if unknown:
    raise CocoFormatError(
        f'{len(unknown)} of the {len(records)} image files of {ann_file} are '
        f'not in an image format OpenCV can read: {_listing(unknown)}')
  if wrong:
    more = f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''
    raise CocoFormatError(
        f'{len(wrong)} image(s) of {ann_file} do not have their annotated '
        f'size: {"; ".join(wrong[:3])}{more}')


def fill_category_names(coco, names: Mapping[int, str] | None,
                        where: str) -> tuple[str, ...]:
  """The names of a COCO's categories in label (sorted id) order.

  A category without a ``name`` (neither training nor evaluation needs
  one) is named ``names[id]`` (the config's ``data.category_ids`` ->
  ``data.class_names``), else ``'category <id>'``; the name is written into
  ``coco.cats`` and one warning lists what was filled in.

  Args:
    coco: a pycocotools ``COCO`` (its ``cats`` are completed in place).
    names: fallback names by category id, or None.
    where: the annotation file, for the warning.

  Returns:
    ``(C,)`` names, C = the number of categories.
  """
  filled = []
  for cat_id in sorted(coco.cats):
    cat = coco.cats[cat_id]
    if not isinstance(cat.get('name'), str) or not cat['name']:
      cat['name'] = str((names or {}).get(cat_id) or f'category {cat_id}')
      filled.append(f'{cat_id}: {cat["name"]!r}')
  if filled:
    logger.warning(
        '%s: %d categor%s without a "name"; named from the config\'s '
        "data.class_names (or 'category <id>'): %s", where, len(filled),
        'y' if len(filled) == 1 else 'ies', _listing(filled))
  return tuple(coco.cats[c]['name'] for c in sorted(coco.cats))


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
    category_names: names by category id for categories without a
      ``name`` (``fill_category_names``); default ``'category <id>'``.

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
               min_size: int = 32,
               category_names: Mapping[int, str] | None = None):
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
    self.class_names = fill_category_names(self.coco, category_names,
                                           self.ann_file)
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
