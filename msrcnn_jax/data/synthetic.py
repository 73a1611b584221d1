"""Seeded synthetic instance-segmentation data: simple shapes on textures.

Each image has a noisy gradient background and 1..max_objects filled shapes
(rectangle, ellipse, triangle, ... one class per shape) of varied size and
colour, drawn in order so that later shapes occlude earlier ones. Masks are
the exactly known *visible* pixels of each shape; boxes are the tight boxes
of those masks, ``(x1, y1, x2 + 1, y2 + 1)`` over the mask's pixel indices
(COCO convention: a one-pixel object has width 1). Shapes left with fewer
than ``min_visible`` pixels are dropped.

Records have the format of ``msrcnn_jax.data.coco`` records, with the pixels
in ``image`` (BGR uint8) and exact ``masks`` instead of a file path.
``write_coco`` writes the same data as a COCO directory (PNG + RLE JSON);
from the command line::

  python -m msrcnn_jax.data.synthetic --out DIR [--num-train 200]
      [--num-val 20] [--seed 0] [--image-size 128] [--max-objects 4]
      [--num-classes 3] [--train-split train] [--val-split val]

writes ``DIR/annotations/instances_{train,val}.json`` and ``DIR/{train,val}/``
(the layout ``data.source=coco`` reads) and prints the overrides that train
on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import cv2
import numpy as np

from msrcnn_jax.ops.masks import encode_rle

SHAPE_NAMES = ('rectangle', 'ellipse', 'triangle', 'diamond', 'pentagon',
               'hexagon')
_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
DEFAULT_CFG = dict(num_train=2000, num_val=100, image_size=(128, 128),
                   max_objects=4, num_classes=3, cache=False)


def _cfg_get(cfg, key):
  """``cfg[key]`` of a dict / ConfigDict / None, defaulting to DEFAULT_CFG."""
  return DEFAULT_CFG[key] if cfg is None else cfg.get(key, DEFAULT_CFG[key])


def categories(num_classes: int) -> list[dict[str, Any]]:
  """COCO ``categories``: ids 1..num_classes named after the shapes."""
  if not 1 <= num_classes <= len(SHAPE_NAMES):
    raise ValueError(f'num_classes must be in 1..{len(SHAPE_NAMES)}')
  return [dict(id=i + 1, name=SHAPE_NAMES[i], supercategory='shape')
          for i in range(num_classes)]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  base = rng.uniform(30, 225, 3)
  slope = rng.uniform(-60, 60, (2, 3))
  yy = np.linspace(-0.5, 0.5, h)[:, None, None]
  xx = np.linspace(-0.5, 0.5, w)[None, :, None]
  img = base + yy * slope[0] + xx * slope[1]
  # Coarse blotches (upsampled noise) plus fine pixel noise.
  coarse = rng.normal(0, 18, (max(h // 16, 2), max(w // 16, 2), 3))
  img = img + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
  img = img + rng.normal(0, 6, (h, w, 3))
  return img


def _shape_polygon(cls: int, cx: float, cy: float, rx: float, ry: float,
                   angle: float) -> np.ndarray | None:
  """Vertices (K, 2) of polygon shapes; None for the ellipse."""
  name = SHAPE_NAMES[cls]
  if name == 'ellipse':
    return None
  if name == 'rectangle':
    pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
  elif name == 'diamond':
    pts = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], np.float64)
  else:
    k = {'triangle': 3, 'pentagon': 5, 'hexagon': 6}[name]
    t = np.arange(k) * 2 * np.pi / k - np.pi / 2
    pts = np.stack([np.cos(t), np.sin(t)], 1)
  pts = pts * [rx, ry]
  c, s = np.cos(angle), np.sin(angle)
  pts = pts @ np.array([[c, s], [-s, c]])
  return pts + [cx, cy]


def generate(rng: np.random.Generator, height: int, width: int,
             max_objects: int, num_classes: int, min_visible: int = 16):
  """One synthetic image.

  Returns:
    (image (H, W, 3) uint8 BGR, masks (G, H, W) uint8 {0,1}, boxes (G, 4)
    float32 x1,y1,x2,y2 original pixels, labels (G,) int32 in 0..C-1).
  """
  img = _background(rng, height, width)
  owner = np.full((height, width), -1, np.int32)
  classes = []
  n_obj = int(rng.integers(1, max_objects + 1))
  short = min(height, width)
  for k in range(n_obj):
    cls = int(rng.integers(num_classes))
    rx = rng.uniform(0.06, 0.3) * short
    ry = rx * rng.uniform(0.5, 2.0)
    cx = rng.uniform(0.1, 0.9) * width
    cy = rng.uniform(0.1, 0.9) * height
    angle = rng.uniform(0, np.pi)
    shape = np.zeros((height, width), np.uint8)
    poly = _shape_polygon(cls, cx, cy, rx, ry, angle)
    if poly is None:
      cv2.ellipse(shape, (int(round(cx)), int(round(cy))),
                  (int(round(rx)), int(round(ry))), float(np.degrees(angle)),
                  0, 360, 1, -1)
    else:
      cv2.fillPoly(shape, [np.round(poly).astype(np.int32)], 1)
    colour = rng.uniform(0, 255, 3)
    sigma = rng.uniform(2, 12)
    x, y, w, h = cv2.boundingRect(shape)
    if w and h:  # texture noise drawn only over the shape's bounding box
      inside = shape[y:y + h, x:x + w].astype(bool)
      texture = colour + rng.normal(0, sigma, (h, w, 3))
      img[y:y + h, x:x + w][inside] = texture[inside]
      owner[y:y + h, x:x + w][inside] = k
    classes.append(cls)
  img = np.clip(np.round(img), 0, 255).astype(np.uint8)
  masks, boxes, labels = [], [], []
  for k, cls in enumerate(classes):
    m = owner == k
    if m.sum() < min_visible:
      continue
    ys, xs = np.nonzero(m)
    masks.append(m.astype(np.uint8))
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    labels.append(cls)
  if masks:
    masks = np.stack(masks)
  else:
    masks = np.zeros((0, height, width), np.uint8)
  return (img, masks, np.array(boxes, np.float32).reshape(-1, 4),
          np.array(labels, np.int32))


class SyntheticDataset:
  """Deterministic synthetic records (same format as ``coco.CocoSource``).

  Record ``i`` of a split depends only on (seed, split, i).

  Args:
    split: 'train', 'val' or 'test'.
    cfg: ``cfg.data.synthetic`` (num_train, num_val, image_size (h, w),
      max_objects, num_classes); None for defaults.
    seed: generator seed.
  """

  def __init__(self, split: str, cfg=None, seed: int = 0):
    if split not in _SPLIT_IDS:
      raise ValueError(f'unknown synthetic split {split!r}')
    self.split = split
    self.seed = int(seed)
    self.height, self.width = (int(v) for v in _cfg_get(cfg, 'image_size'))
    self.max_objects = int(_cfg_get(cfg, 'max_objects'))
    self.num_classes = int(_cfg_get(cfg, 'num_classes'))
    self.categories = categories(self.num_classes)
    self.cat_ids = tuple(c['id'] for c in self.categories)
    self.class_names = tuple(c['name'] for c in self.categories)
    n = _cfg_get(cfg, 'num_train' if split == 'train' else 'num_val')
    # Keep generated records in memory (later epochs reuse them; about
    # 0.1 MB per 128x128 record).
    self._cache = {} if _cfg_get(cfg, 'cache') else None
    self._len = int(n)

  def __len__(self) -> int:
    return self._len

  def image_sizes(self) -> np.ndarray:
    """``(N, 2)`` int (height, width) of every record, without generating."""
    return np.tile([[self.height, self.width]], (self._len, 1))

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < self._len:
      raise IndexError(i)
    if self._cache is not None:
      rec = self._cache.get(i)
      if rec is None:
        rec = self._cache[i] = self._generate(i)
      return dict(rec)
    return self._generate(i)

  def _generate(self, i: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(i)])
    img, masks, boxes, labels = generate(rng, self.height, self.width,
                                         self.max_objects, self.num_classes)
    return dict(image_id=int(i) + 1, file_name=f'{int(i):06d}.png',
                path=None, height=self.height, width=self.width,
                boxes=boxes, labels=labels, image=img, masks=masks)


def write_coco(directory: str, split: str, n: int, cfg=None,
               seed: int = 0) -> str:
  """Writes ``n`` synthetic images as a COCO instance-segmentation dataset.

  Layout: ``directory/annotations/instances_<split>.json`` (segmentation as
  compressed RLE, ``bbox`` [x, y, w, h], ``area`` = mask pixels,
  ``iscrowd`` 0) and ``directory/<split>/<image>.png``.

  Args:
    directory: dataset root (created).
    split: split name used in the file names; records are generated as the
      'val' synthetic split when ``split`` contains 'val', else 'train'.
    n: number of images.
    cfg: ``cfg.data.synthetic`` or None (image_size, max_objects,
      num_classes are used; ``n`` overrides the split length).
    seed: generator seed.

  Returns:
    The annotation file path.
  """
  base = {k: _cfg_get(cfg, k) for k in DEFAULT_CFG}
  base['num_train'] = base['num_val'] = int(n)
  ds = SyntheticDataset('val' if 'val' in split else 'train', base, seed)
  img_dir = os.path.join(directory, split)
  ann_dir = os.path.join(directory, 'annotations')
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(ann_dir, exist_ok=True)
  images, anns = [], []
  for i in range(n):
    r = ds[i]
    if not cv2.imwrite(os.path.join(img_dir, r['file_name']), r['image']):
      raise IOError(f'cannot write {os.path.join(img_dir, r["file_name"])}')
    images.append(dict(id=r['image_id'], file_name=r['file_name'],
                       height=r['height'], width=r['width']))
    for m, b, l in zip(r['masks'], r['boxes'], r['labels']):
      x1, y1, x2, y2 = (float(v) for v in b)
      anns.append(dict(id=len(anns) + 1, image_id=r['image_id'],
                       category_id=int(ds.cat_ids[int(l)]),
                       bbox=[x1, y1, x2 - x1, y2 - y1],
                       area=float(m.sum()), iscrowd=0,
                       segmentation=encode_rle(m)))
  path = os.path.join(ann_dir, f'instances_{split}.json')
  with open(path, 'w') as f:
    json.dump(dict(images=images, annotations=anns,
                   categories=ds.categories), f)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m msrcnn_jax.data.synthetic``: writes a COCO-format synthetic
  dataset (train and val splits) and prints how to train on it.

  Returns:
    The exit status (0); argparse exits 2 on bad arguments, and an output
    that cannot be written ends in one ``error:`` line and status 1.
  """
  parser = argparse.ArgumentParser(
      prog='python -m msrcnn_jax.data.synthetic',
      description='Write a COCO-format synthetic shapes dataset (PNG images, '
                  'RLE masks): DIR/annotations/instances_<split>.json and '
                  'DIR/<split>/.')
  parser.add_argument('--out', required=True, help='dataset directory')
  parser.add_argument('--num-train', type=int, default=200)
  parser.add_argument('--num-val', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--image-size', type=int, nargs='+', default=[128],
                      metavar='N', help='H [W] (default 128 128)')
  parser.add_argument('--max-objects', type=int, default=4)
  parser.add_argument('--num-classes', type=int, default=3,
                      help=f'1..{len(SHAPE_NAMES)}')
  parser.add_argument('--train-split', default='train')
  parser.add_argument('--val-split', default='val')
  args = parser.parse_args(argv)
  size = list(args.image_size) * (2 if len(args.image_size) == 1 else 1)
  problems = [f'--{k} {v} must be >= {lo}' for k, v, lo in (
      ('num-train', args.num_train, 0), ('num-val', args.num_val, 0),
      ('max-objects', args.max_objects, 1), ('image-size', min(size), 16))
              if v < lo]
  if len(size) != 2:
    problems.append('--image-size takes H or H W')
  if not 1 <= args.num_classes <= len(SHAPE_NAMES):
    problems.append(f'--num-classes must be in 1..{len(SHAPE_NAMES)}')
  if problems:
    parser.error('; '.join(problems))
  cfg = dict(image_size=tuple(size), max_objects=args.max_objects,
             num_classes=args.num_classes)
  try:
    for split, n in ((args.train_split, args.num_train),
                     (args.val_split, args.num_val)):
      path = write_coco(args.out, split, n, cfg, seed=args.seed)
      print(f'{n} images -> {os.path.join(args.out, split)}, {path}')
  except OSError as e:
    print(f'error: cannot write the dataset to {args.out}: {e}',
          file=sys.stderr)
    return 1
  print('train on it: python train.py --config.data.source=coco '
        f'--config.data.coco_dir={os.path.abspath(args.out)} '
        f'--config.data.train_split={args.train_split} '
        f'--config.data.val_split={args.val_split}' +
        ('' if args.num_classes == DEFAULT_CFG['num_classes'] else
         f' (with a config of {args.num_classes} classes: model.num_classes, '
         'data.category_ids, data.class_names)'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
