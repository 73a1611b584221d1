"""Image decoding as mmdetection 2.x's ``LoadImageFromFile`` (spec §1.3).

mmdetection 2.x reads the file's bytes and calls mmcv 1.x
``imfrombytes(content, flag='color', channel_order='bgr')`` with the cv2
backend, i.e. ``cv2.imdecode(np.frombuffer(content, np.uint8),
cv2.IMREAD_COLOR)``. ``IMREAD_COLOR`` means: always 3 channels BGR uint8
(grayscale replicated, alpha dropped, 16-bit scaled down to 8 bits by
OpenCV) and the EXIF orientation applied. We call the same decoder, so the
pixels are the same; what we add is a clear error where mmcv would hand on
``None``.

mmdetection does not compare the decoded size with the annotation file's
``width``/``height``, so a JPEG whose EXIF orientation turns it (stored
128x96, displayed 96x128) trains on annotations that do not fit its pixels.
detectron2 raises ``SizeMismatchError`` when it decodes such an image;
``displayed_size`` lets the data sources refuse it before any work, from the
file header (``coco.check_image_files``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import cv2
import numpy as np

from msrcnn_jax.errors import UserError


class ImageReadError(UserError, IOError):
  """A file (or byte string) that could not be decoded as an image."""


# Extensions of formats OpenCV decodes: such a file that does not decode is
# damaged, not of an unknown format.
IMAGE_EXTENSIONS = frozenset(('.png', '.jpg', '.jpeg', '.jpe', '.bmp', '.tif',
                              '.tiff', '.webp', '.ppm', '.pgm', '.pbm'))


def undecodable(name: str) -> str:
  """Why a file named ``name`` did not decode: ``'corrupt or truncated'``
  for an image extension, else ``'not an image format OpenCV can read'``."""
  if os.path.splitext(str(name))[1].lower() in IMAGE_EXTENSIONS:
    return 'corrupt or truncated'
  return 'not an image format OpenCV can read'


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
    raise ImageReadError(f'cannot decode image {name}: {undecodable(name)} '
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


_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotate by 90 or 270 degrees


def displayed_size(path: str) -> tuple[tuple[int, int], tuple[int, int],
                                       int] | None:
  """The size ``imread`` gives a file, read from its header (no decoding).

  OpenCV's ``IMREAD_COLOR`` applies the EXIF orientation of JPEG, PNG,
  WebP and TIFF files; orientations 5-8 swap height and width.

  Args:
    path: an image file.

  Returns:
    ``((height, width) displayed, (height, width) stored, EXIF orientation
    (1 when absent))``, or None when Pillow cannot read the header (the
    size is then checked when the image is decoded).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      tags = getattr(im, 'tag_v2', None)  # TIFF: the stored size is in tags
      if tags is not None and 256 in tags and 257 in tags:
        w, h = int(tags[256]), int(tags[257])
        orientation = tags.get(_EXIF_ORIENTATION, 1)
      else:
        w, h = im.size
        # The EXIF block the header holds (JPEG APP1, PNG eXIf before IDAT,
        # WebP); im.getexif() would decode a whole PNG to look further.
        exif = Image.Exif()
        if im.info.get('exif'):
          exif.load(im.info['exif'])
        orientation = exif.get(_EXIF_ORIENTATION, 1)
      orientation = int(orientation or 1)
  except Exception:  # pylint: disable=broad-except  # not for Pillow
    return None
  shown = (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)
  return shown, (h, w), orientation


def size_mismatch_message(name: str, expected_hw, shown_hw,
                          stored_hw=None, orientation: int = 1) -> str:
  """One line saying that a file does not have its annotated size.

  Args:
    name: the file and the image id, as the message should name them.
    expected_hw: (height, width) from the annotation file.
    shown_hw: (height, width) the decoder gives (EXIF orientation applied).
    stored_hw: (height, width) of the stored pixels, when known.
    orientation: the file's EXIF orientation (1 = none).
  """
  wh = lambda hw: f'{int(hw[1])}x{int(hw[0])}'
  msg = (f'{name}: the annotation file gives width x height '
         f'{wh(expected_hw)} but the image decodes to {wh(shown_hw)}')
  if (orientation in _TRANSPOSING_ORIENTATIONS and stored_hw is not None
      and tuple(expected_hw) == tuple(stored_hw)):
    msg += (f' because its EXIF Orientation={orientation} rotates the stored '
            f'{wh(stored_hw)} pixels (OpenCV and mmcv apply it; the tool '
            'that wrote the annotations did not). Rotate the pixels and drop '
            'the tag (e.g. PIL.ImageOps.exif_transpose) or annotate the '
            'displayed image')
  else:
    msg += '; fix the width/height (and the annotations) in the file'
  return msg


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
