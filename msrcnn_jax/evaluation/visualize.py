"""Draw detection records (boxes, masks, box score and MaskIoU) on images."""

from __future__ import annotations

import colorsys
import os
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw, ImageFont


def label_color(label: int) -> Tuple[int, int, int]:
  """A fixed, well-spread RGB colour per label (golden-ratio hue steps)."""
  hue = (int(label) * 0.618033988749895) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
  return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image_rgb: np.ndarray, record: Dict[str, Any],
                    class_names: Sequence[str], score_thr: float = 0.3,
                    mask_alpha: float = 0.5) -> np.ndarray:
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

  Returns:
    ``(H, W, 3)`` uint8 image: translucent masks, box outlines and a caption
    ``"<class> <box score> | mIoU <predicted MaskIoU>"`` per detection.
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
  boxes = np.asarray(record['boxes'], np.float32).reshape(-1, 4)
  scores = np.asarray(record['scores'], np.float32).reshape(-1)
  labels = np.asarray(record['labels']).reshape(-1).astype(np.int64)
  mask_iou = record.get('mask_iou')
  masks = record.get('masks')
  keep = np.nonzero(scores >= score_thr)[0]
  # Lowest score first, so the most confident detection ends on top.
  keep = keep[np.argsort(scores[keep], kind='stable')]

  canvas = image.astype(np.float32)
  if masks is not None:
    for i in keep:
      m = mask_util.decode(masks[i]).astype(bool)
      if m.shape != (h, w):
        raise ValueError(f'mask {m.shape} does not match image {(h, w)}')
      color = np.asarray(label_color(labels[i]), np.float32)
      canvas[m] = canvas[m] * (1 - mask_alpha) + color * mask_alpha
  out = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  for i in keep:
    color = label_color(labels[i])
    x1, y1, x2, y2 = [float(v) for v in boxes[i]]
    draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
    name = (class_names[labels[i]] if 0 <= labels[i] < len(class_names)
            else str(int(labels[i])))
    text = f'{name} {scores[i]:.2f}'
    if mask_iou is not None:
      text += f' | mIoU {float(np.asarray(mask_iou).reshape(-1)[i]):.2f}'
    tx, ty = x1, max(0.0, y1 - 12)
    left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
    draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
    draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
  return np.asarray(out, np.uint8)


def save_visualization(path: str, image_rgb: np.ndarray,
                       record: Dict[str, Any], class_names: Sequence[str],
                       score_thr: float = 0.3,
                       mask_alpha: float = 0.5) -> np.ndarray:
  """``draw_detections`` and write the result as PNG to ``path``.

  Returns:
    The drawn ``(H, W, 3)`` uint8 image.
  """
  drawn = draw_detections(image_rgb, record, class_names,
                          score_thr=score_thr, mask_alpha=mask_alpha)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(drawn).save(path, format='PNG')
  return drawn
