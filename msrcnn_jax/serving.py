"""Runs a detector exported by ``msrcnn_jax.export``: no model code, no Flax.

An export directory holds (``msrcnn_jax.export`` writes it):

- ``contract.json``: the input contract (``CONTRACT_FILE``): batch size,
  compute dtype, shape buckets and their program files, the test pipeline's
  resize scale, normalisation and padding divisor, class names, category ids,
  the mask binarisation threshold, and the shapes and dtypes of every input
  and output;
- ``detector_<H>x<W>.stablehlo``: one ``jax.export`` serialized program per
  bucket, ``f(weights, image, img_shape, pad_shape, scale_factor) ->
  outputs`` (the jitted ``inference.Predictor.forward``). Each program
  carries its contract: its function name is ``PROGRAM_PREFIX`` + the
  digest of the contract it was exported with (``contract_digest``), and its
  input shapes are the batch size and the bucket;
- ``weights.npz``: the flat list of weight arrays ``weights`` (``arr_0`` ..)
  every program takes first;
- ``saved_model/``: the same programs as a TensorFlow SavedModel (jax2tf),
  one signature ``detect_<H>x<W>`` per bucket.

``ExportedPredictor`` checks every program against ``contract.json`` before
any work (an edited preprocessing, class list, batch size or bucket is an
``ExportError`` naming the file), preprocesses images with ``msrcnn_jax.data.transforms``
(mmdetection's test pipeline), deserializes the programs, calls them and
postprocesses their fixed-size outputs (``msrcnn_jax.postprocess``): the same
records as ``inference.Predictor``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax
from jax import export as jax_export
import ml_collections
import numpy as np

from msrcnn_jax import errors
from msrcnn_jax.inference import BATCH_KEYS, Predictor

CONTRACT_FILE = 'contract.json'
WEIGHTS_FILE = 'weights.npz'
SAVED_MODEL_DIR = 'saved_model'
FORMAT = 'msrcnn_jax.export/2'
# Exports written before programs carried their contract's digest: read,
# with a warning that the contract cannot be checked.
UNCHECKED_FORMATS = ('msrcnn_jax.export/1',)
PROGRAM_PREFIX = 'msrcnn_detector_contract_'
# What a program's results depend on besides its weights and inputs.
CONTRACT_KEYS = ('format', 'batch_size', 'dtype', 'platforms', 'buckets',
                 'num_weights', 'preprocess', 'postprocess', 'class_names',
                 'category_ids')


class ExportError(errors.UserError, ValueError):
  """An export directory is missing, malformed, or lacks a shape asked of it."""


def bucket_name(hw: Sequence[int]) -> str:
  """``(800, 1344)`` -> ``'800x1344'``."""
  return f'{int(hw[0])}x{int(hw[1])}'


def contract_digest(contract: dict[str, Any]) -> str:
  """Hex digest (24 digits of SHA-256) of the ``CONTRACT_KEYS`` entries of a
  contract, as written to JSON (tuples and lists alike)."""
  essential = {k: contract.get(k) for k in CONTRACT_KEYS}
  text = json.dumps(essential, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_contract(directory: str) -> dict[str, Any]:
  """The parsed ``contract.json`` of an export directory.

  Raises:
    ExportError: no such directory or file, or not an msrcnn_jax export.
  """
  path = os.path.join(directory, CONTRACT_FILE)
  if not os.path.isdir(directory):
    raise ExportError(f'export directory not found: {directory}')
  if not os.path.isfile(path):
    raise ExportError(f'{path} not found: {directory} is not a directory '
                      'written by python -m msrcnn_jax.export')
  try:
    with open(path) as f:
      contract = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f'cannot read {path}: {e}') from e
  if not isinstance(contract, dict) or contract.get('format') not in (
      (FORMAT,) + UNCHECKED_FORMATS):
    found = contract.get('format') if isinstance(contract, dict) else None
    raise ExportError(f'{path}: format {found!r}, expected {FORMAT!r}')
  return contract


class ExportedPredictor(Predictor):
  """``inference.Predictor`` over an export directory's programs.

  Args:
    directory: written by ``python -m msrcnn_jax.export``.

  Attributes:
    contract: the parsed ``contract.json``.
    batch_size: images per call (every program's leading dimension).
    config: a ConfigDict with the ``data`` (img_scale, mean, std, to_rgb,
      size_divisor, buckets, class_names, category_ids) and
      ``test.rcnn.mask_thr_binary`` keys the predictor and ``predict`` read.

  Raises:
    ExportError: a missing or malformed export, or a ``contract.json`` that
      is not the one its programs were exported with (edited since: a
      different batch size, bucket, preprocessing, class list, ...), found
      before any image is read.
  """

  def __init__(self, directory: str):  # pylint: disable=super-init-not-called
    self.directory = directory
    self.contract = c = read_contract(directory)
    path = os.path.join(directory, CONTRACT_FILE)
    try:
      self.batch_size = int(c['batch_size'])
      pre = c['preprocess']
      self.config = ml_collections.ConfigDict(dict(
          name=c.get('config_name', ''),
          data=dict(img_scale=tuple(pre['img_scale']),
                    mean=tuple(pre['mean']), std=tuple(pre['std']),
                    to_rgb=bool(pre['to_rgb']),
                    size_divisor=int(pre['size_divisor']),
                    buckets=tuple(tuple(int(v) for v in b)
                                  for b in c['buckets']),
                    class_names=tuple(c['class_names']),
                    category_ids=tuple(c['category_ids'])),
          test=dict(rcnn=dict(
              mask_thr_binary=float(c['postprocess']['mask_thr_binary'])))))
      weights_path = os.path.join(directory, c['weights'])
      num_weights = int(c['num_weights'])
      files = dict(c['programs'])
    except (KeyError, TypeError, ValueError) as e:
      raise ExportError(f'{path} is malformed ({type(e).__name__}: {e}); '
                        're-export with python -m msrcnn_jax.export') from e
    try:
      with np.load(weights_path) as z:
        self.weights = [z[f'arr_{i}'] for i in range(len(z.files))]
    except (OSError, ValueError, KeyError) as e:
      raise ExportError(f'cannot read weights {weights_path}: {e}') from e
    self._programs: dict[tuple[int, int], Any] = {}
    # Predictor's post-processing state: masks pasted on the host, records
    # made in this process.
    self.paste_on_device = False
    self.postprocess_workers = 0
    self.timings: dict[str, float] = {}
    self._pool = None
    self._check_programs(path, files, num_weights)

  def _check_programs(self, path: str, files: dict[str, str],
                      num_weights: int) -> None:
    """Every bucket's program against the contract (before any work).

    Raises:
      ExportError: a bucket without a program, a program whose input shape
        is not (batch_size, H, W, 3) of its bucket or whose weights count
        differs, or (format 2) a contract whose digest is not the one the
        program was exported with.
    """
    c = self.contract
    digest = contract_digest(c)
    for bucket in self.config.data.buckets:
      name = bucket_name(bucket)
      if name not in files:
        raise ExportError(f'{path}: bucket {name} has no program (programs: '
                          f'{", ".join(files) or "none"})')
      exp = self.program(bucket)
      program = os.path.join(self.directory, files[name])
      expected = (self.batch_size, int(bucket[0]), int(bucket[1]), 3)
      avals = exp.in_avals
      if len(avals) != num_weights + len(BATCH_KEYS):
        raise ExportError(
            f'{path} does not match {program}: num_weights {num_weights}, '
            f'the program takes {len(avals) - len(BATCH_KEYS)} weight '
            'arrays; re-export with python -m msrcnn_jax.export')
      got = tuple(int(v) for v in avals[num_weights].shape)
      if got != expected:
        raise ExportError(
            f'{path} does not match {program}: the contract says batch '
            f'{self.batch_size} and bucket {name}, the program takes images '
            f'of shape {got[0]}x{got[1]}x{got[2]}x{got[3]} (batch '
            f'{got[0]}, bucket {got[1]}x{got[2]}); re-export with python -m '
            'msrcnn_jax.export')
      if c['format'] in UNCHECKED_FORMATS:
        continue
      carried = (exp.fun_name[len(PROGRAM_PREFIX):]
                 if exp.fun_name.startswith(PROGRAM_PREFIX) else None)
      if carried != digest:
        raise ExportError(
            f'{path} is not the contract {program} was exported with (it '
            'was edited: its preprocessing, classes, batch size, buckets or '
            'dtype differ; contract digest ' + digest + ', program '
            f'{carried or "none"}); restore it or re-export with python -m '
            'msrcnn_jax.export')
    if c['format'] in UNCHECKED_FORMATS:
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.warning('%s: an export of format %s, whose programs do not '
                      'carry their contract: an edited contract.json cannot '
                      'be detected (re-export to check it).', path,
                      c['format'])

  def _check_batch_size(self, n: int) -> None:
    if int(n) != self.batch_size:
      raise ExportError(
          f'the export in {self.directory} takes batches of '
          f'{self.batch_size} images (contract.json batch_size), not {n}: '
          f'use --batch-size {self.batch_size} or re-export with '
          f'--batch-size {n}')

  def program(self, bucket: Sequence[int]) -> jax_export.Exported:
    """The deserialized program of a bucket ``(H, W)``.

    Raises:
      ExportError: the export has no program for this bucket.
    """
    key = (int(bucket[0]), int(bucket[1]))
    if key not in self._programs:
      name = bucket_name(key)
      files = self.contract['programs']
      if name not in files:
        raise ExportError(
            f'the export in {self.directory} has no program for bucket '
            f'{name}; it has {", ".join(files)} (re-export with --bucket '
            f'{name})')
      path = os.path.join(self.directory, files[name])
      try:
        with open(path, 'rb') as f:
          self._programs[key] = jax_export.deserialize(bytearray(f.read()))
      except (OSError, ValueError) as e:
        raise ExportError(f'cannot read program {path}: {e}') from e
    return self._programs[key]

  def detect(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Outputs of the bucket's program for a padded batch (device arrays;
    the same keys as ``Predictor.detect``).

    Raises:
      ExportError: the batch size or bucket is not one the export has.
    """
    image = batch['image']
    self._check_batch_size(image.shape[0])
    exp = self.program(image.shape[1:3])
    return exp.call(self.weights, *(np.asarray(batch[k]) for k in BATCH_KEYS))

  def predict_images(self, paths: Sequence[str], batch_size: int | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """``Predictor.predict_images`` with the export's batch size (default).

    Raises:
      ExportError: ``batch_size`` is not the export's, or an image needs a
        bucket larger than every exported one.
    """
    if batch_size is not None:
      self._check_batch_size(batch_size)
    try:
      return super().predict_images(paths, self.batch_size, progress)
    except ValueError as e:
      if isinstance(e, ExportError) or 'no bucket in' not in str(e):
        raise
      raise ExportError(
          f'the export in {self.directory} lacks a bucket: '
          f'{str(e).split(";")[0]} (re-export with a --bucket HxW that '
          'holds it)') from e
