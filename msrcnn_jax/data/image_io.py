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


class CorruptImageError(ImageReadError):
  """Content of a known image format that does not decode completely."""


# Signatures of the formats OpenCV decodes (imgcodecs' own checks).
_SIGNATURES = ((b'\xff\xd8\xff', 'JPEG'), (b'\x89PNG\r\n\x1a\n', 'PNG'),
               (b'BM', 'BMP'), (b'II*\x00', 'TIFF'), (b'MM\x00*', 'TIFF'),
               (b'RIFF', 'WebP'))


def image_format(content: bytes) -> str | None:
  """'JPEG', 'PNG', 'BMP', 'TIFF' or 'WebP' from the first bytes, or None."""
  for magic, name in _SIGNATURES:
    if content[:len(magic)] == magic:
      return name
  return None


def truncation(content: bytes) -> str | None:
  """Why a JPEG or PNG file's content is incomplete, or None.

  Some OpenCV builds decode a truncated JPEG into a partly grey image with
  only a libjpeg warning on stderr. A complete JPEG has an EOI marker
  (FFD9) after its last scan (SOS, FFDA; neither occurs inside
  entropy-coded data), a complete PNG an IEND chunk after its last IDAT
  chunk. Other formats are left to the decoder.
  """
  fmt = image_format(content)
  if fmt == 'JPEG':
    sos = content.rfind(b'\xff\xda')
    if sos < 0 or content.find(b'\xff\xd9', sos) < 0:
      return 'a JPEG without its end-of-image marker after the last scan'
  elif fmt == 'PNG':
    if content.rfind(b'IEND') < max(content.rfind(b'IDAT'), 8):
      return 'a PNG without its IEND chunk after the image data'
  return None


def header_problem(path: str) -> str:
  """Why a file whose header no OpenCV decoder recognises is not an image.

  Reads at most the first 16 bytes. Returns ``'empty file (0 bytes)'``,
  ``'corrupt or truncated <format> file'`` (a known signature, e.g. a PNG
  cut inside its header) or ``'not an image format OpenCV can read'``.
  """
  with open(path, 'rb') as f:
    head = f.read(16)
  if not head:
    return 'empty file (0 bytes)'
  fmt = image_format(head)
  if fmt is not None:
    return f'corrupt or truncated {fmt} file'
  return 'not an image format OpenCV can read'


def imfrombytes(content: bytes, name: str = '<bytes>') -> np.ndarray:
  """Decodes encoded image bytes (PNG, JPEG, ...) as cv2 ``IMREAD_COLOR``.

  Args:
    content: the encoded file content.
    name: what to call the source in error messages (e.g. the file path).

  Returns:
    ``(H, W, 3)`` uint8 BGR image, C-contiguous.

  Raises:
    CorruptImageError: content of a known format (``image_format``) that
      cv2 cannot decode, or a truncated JPEG/PNG (``truncation``) that it
      would decode only partly; the message says "corrupt or truncated".
    ImageReadError: empty content or content of no format cv2 reads.
  """
  if content is None or len(content) == 0:
    raise ImageReadError(f'cannot decode image {name}: empty content')
  content = bytes(content)
  buf = np.frombuffer(content, np.uint8)
  try:
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
  except cv2.error as e:  # pragma: no cover - cv2 normally returns None
    img, error = None, f' ({e})'
  else:
    error = ''
  fmt = image_format(content)
  if img is None and fmt is None:
    raise ImageReadError(
        f'cannot decode image {name}: not an image format OpenCV can read '
        f'({len(content)} bytes){error}')
  cut = truncation(content)
  if img is None or cut:
    raise CorruptImageError(
        f'cannot decode image {name}: corrupt or truncated {fmt} file '
        f'({len(content)} bytes{"; " + cut if cut else ""}){error}')
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
