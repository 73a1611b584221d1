"""Draw detection records (boxes, masks, box score and MaskIoU) on images.

Pictures are drawn at a legible size: ``save_visualization`` upscales an
image whose short side is under ``MIN_PICTURE_SIDE`` pixels (the
quickstart's 128 px images become 512 px) before drawing, with a caption
font scaled to the picture, and keeps every caption inside the picture and
off the captions already placed.
"""

from __future__ import annotations

import colorsys
import os
from typing import Any, Dict, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw, ImageFont


MIN_PICTURE_SIDE = 512


def label_color(label: int) -> Tuple[int, int, int]:
  """A fixed, well-spread RGB colour per label (golden-ratio hue steps)."""
  hue = (int(label) * 0.618033988749895) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
  return int(r * 255), int(g * 255), int(b * 255)


def _font(short_side: int):
  """A caption font about 1/40 of the picture's short side (at least 11
  px); Pillow's bitmap font where no scalable one is available."""
  size = max(11, int(round(short_side / 40)))
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: a fixed bitmap font only
    return ImageFont.load_default()


def _place_caption(draw, text, font, box, size, placed):
  """The top-left corner of a caption for ``box``: above it, else just
  inside its top edge, moved down past captions already ``placed``, and
  kept inside the ``size`` (w, h) picture."""
  w, h = size
  x1, y1, _, y2 = box
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  tw, th = right - left + 2, bottom - top + 2
  tx = min(max(0.0, x1), max(0.0, w - tw - 1))
  ty = y1 - th - 1 if y1 - th - 1 >= 0 else y1 + 1
  for _ in range(len(placed) + 1):
    rect = (tx, ty, tx + tw, ty + th)
    clash = [r for r in placed if rect[0] < r[2] and r[0] < rect[2]
             and rect[1] < r[3] and r[1] < rect[3]]
    if not clash:
      break
    ty = max(r[3] for r in clash) + 1
  ty = min(max(0.0, ty), max(0.0, h - th - 1))
  placed.append((tx, ty, tx + tw, ty + th))
  return tx - left + 1, ty - top + 1, (tx, ty, tx + tw, ty + th)


def draw_detections(image_rgb: np.ndarray, record: Dict[str, Any],
                    class_names: Sequence[str], score_thr: float = 0.3,
                    mask_alpha: float = 0.5, min_side: int = 0) -> np.ndarray:
  """Overlays the detections of one image.

  Args:
    image_rgb: ``(H, W, 3)`` uint8 original image (the frame of the record:
      ``ori_shape`` == (H, W)); ``(H, W)`` grey and ``(H, W, 4)`` RGBA are
      accepted (alpha dropped).
    record: per-image detection record (see ``coco_evaluator``): ``boxes``
      ``(K, 4)`` x1, y1, x2, y2 in original pixels, ``scores``, ``labels``,
      optional ``mask_iou`` ``(K,)`` and ``masks`` (K RLE dicts of size
      (H, W)).
    class_names: label -> name.
    score_thr: detections with box score < ``score_thr`` are not drawn.
    mask_alpha: opacity of the mask colour.
    min_side: upscale the picture (bilinear; masks nearest) so that its
      short side is at least this many pixels before drawing (0: never).

  Returns:
    ``(H * s, W * s, 3)`` uint8 image (``s`` = ``min_side / min(H, W)`` when
    that is > 1, else 1, sides rounded): translucent masks, box outlines and
    a caption ``"<class> <box score> | mIoU <predicted MaskIoU>"`` per
    detection, inside the picture.

  Raises:
    ValueError: an image that is not (H, W[, 3|4]) uint8, or a mask whose
      size is not the image's.
  """
  image = np.asarray(image_rgb)
  if image.ndim == 2:  # grey
    image = np.repeat(image[..., None], 3, axis=2)
  if image.ndim == 3 and image.shape[2] == 4:  # RGBA: alpha dropped
    image = image[..., :3]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'expected (H, W, 3) uint8, got {image.shape} '
                     f'{image.dtype}')
  h, w = image.shape[:2]
  scale = max(1.0, float(min_side) / max(min(h, w), 1)) if min_side else 1.0
  out_w, out_h = int(round(w * scale)), int(round(h * scale))
  boxes = np.asarray(record['boxes'], np.float32).reshape(-1, 4)
  scores = np.asarray(record['scores'], np.float32).reshape(-1)
  labels = np.asarray(record['labels']).reshape(-1).astype(np.int64)
  mask_iou = record.get('mask_iou')
  masks = record.get('masks')
  keep = np.nonzero(scores >= score_thr)[0]
  # Lowest score first, so the most confident detection ends on top.
  keep = keep[np.argsort(scores[keep], kind='stable')]

  if scale != 1.0:
    image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
  canvas = image.astype(np.float32)
  if masks is not None:
    for i in keep:
      m = mask_util.decode(masks[i]).astype(np.uint8)
      if m.shape != (h, w):
        raise ValueError(f'mask {m.shape} does not match image {(h, w)}')
      if scale != 1.0:
        m = cv2.resize(m, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
      m = m.astype(bool)
      color = np.asarray(label_color(labels[i]), np.float32)
      canvas[m] = canvas[m] * (1 - mask_alpha) + color * mask_alpha
  out = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(out)
  font = _font(min(out_w, out_h)) if scale != 1.0 else ImageFont.load_default()
  width = max(2, int(round(scale)))
  placed = []
  for i in keep:
    color = label_color(labels[i])
    x1, y1, x2, y2 = [float(v) * scale for v in boxes[i]]
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
  # Captions over all boxes; the most confident detection's placed first.
  for i in keep[::-1]:
    color = label_color(labels[i])
    x1, y1, x2, y2 = [float(v) * scale for v in boxes[i]]
    name = (class_names[labels[i]] if 0 <= labels[i] < len(class_names)
            else str(int(labels[i])))
    text = f'{name} {scores[i]:.2f}'
    if mask_iou is not None:
      text += f' | mIoU {float(np.asarray(mask_iou).reshape(-1)[i]):.2f}'
    tx, ty, rect = _place_caption(draw, text, font, (x1, y1, x2, y2),
                                  (out_w, out_h), placed)
    draw.rectangle(rect, fill=color)
    draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
  return np.asarray(out, np.uint8)


def save_visualization(path: str, image_rgb: np.ndarray,
                       record: Dict[str, Any], class_names: Sequence[str],
                       score_thr: float = 0.3, mask_alpha: float = 0.5,
                       min_side: int = MIN_PICTURE_SIDE) -> np.ndarray:
  """``draw_detections`` (upscaled to ``min_side``) written as PNG to
  ``path`` (its directory created).

  Returns:
    The drawn uint8 image (see ``draw_detections``).

  Raises:
    ValueError: see ``draw_detections``.
  """
  drawn = draw_detections(image_rgb, record, class_names,
                          score_thr=score_thr, mask_alpha=mask_alpha,
                          min_side=min_side)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(drawn).save(path, format='PNG')
  return drawn
