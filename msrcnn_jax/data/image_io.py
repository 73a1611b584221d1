"""Image decoding as mmdetection 2.x's ``LoadImageFromFile`` (spec §1.3).

mmdetection 2.x reads the file's bytes and calls mmcv 1.x
``imfrombytes(content, flag='color', channel_order='bgr')`` with the cv2
backend, i.e. ``cv2.imdecode(np.frombuffer(content, np.uint8),
cv2.IMREAD_COLOR)``. ``IMREAD_COLOR`` means: always 3 channels BGR uint8
(grayscale replicated, alpha dropped, 16-bit scaled down to 8 bits by
OpenCV) and the EXIF orientation applied. We call the same decoder, so the
pixels are the same; what we add is a clear error where mmcv would hand on
``None``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import cv2
import numpy as np


class ImageReadError(IOError):
  """A file (or byte string) that could not be decoded as an image."""


def imfrombytes(content: bytes, name: str = '<bytes>') -> np.ndarray:
  """Decodes encoded image bytes (PNG, JPEG, ...) as cv2 ``IMREAD_COLOR``.

  Args:
    content: the encoded file content.
    name: what to call the source in error messages (e.g. the file path).

  Returns:
    ``(H, W, 3)`` uint8 BGR image, C-contiguous.

  Raises:
    ImageReadError: empty content or content cv2 cannot decode.
  """
  if content is None or len(content) == 0:
    raise ImageReadError(f'cannot decode image {name}: empty content')
  buf = np.frombuffer(content, np.uint8)
  try:
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
  except cv2.error as e:  # pragma: no cover - cv2 normally returns None
    raise ImageReadError(f'cannot decode image {name}: {e}') from e
  if img is None:
    raise ImageReadError(
        f'cannot decode image {name}: not an image format OpenCV can read '
        f'({len(content)} bytes)')
  if img.ndim == 2:  # defensive; IMREAD_COLOR always returns 3 channels
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
  return np.ascontiguousarray(img)


def imread(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as mmdetection's ``LoadImageFromFile`` does.

  Args:
    path: image file path.

  Returns:
    ``(H, W, 3)`` uint8 BGR image.

  Raises:
    ImageReadError: missing, unreadable or undecodable file; the message
      names the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageReadError(f'image file not found: {path}')
  try:
    with open(path, 'rb') as f:
      content = f.read()
  except OSError as e:
    raise ImageReadError(f'cannot read image file {path}: {e}') from e
  return imfrombytes(content, name=path)


def load_record_image(record: Mapping[str, Any]) -> np.ndarray:
  """The BGR uint8 image of a data record (see ``msrcnn_jax.data.coco``).

  A record holds its pixels in one of three ways, tried in this order:
  ``image`` (an ``(H, W, 3)`` uint8 BGR array, synthetic data),
  ``image_bytes`` (encoded file content, TFDS) or ``path`` (a file).

  Returns:
    ``(H, W, 3)`` uint8 BGR image.
  """
  img = record.get('image')
  if img is not None:
    return img
  content = record.get('image_bytes')
  if content is not None:
    return imfrombytes(content, name=record.get('file_name', '<bytes>'))
  path = record.get('path')
  if not path:
    raise ImageReadError(
        f'record {record.get("image_id")} has no image, image_bytes or path')
  return imread(path)
