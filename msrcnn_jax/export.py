r"""Exports the detector for serving: StableHLO (``jax.export``) + SavedModel.

  python -m msrcnn_jax.export --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --checkpoint ckpt/ms_rcnn_r50_caffe_fpn_1x_coco --output exported/r50 \
      [--batch-size 2] [--bucket 800x1344 --bucket 1344x800 ...] \
      [--dtype bfloat16] [--platforms cpu,cuda] [--nosaved-model]

  python -m msrcnn_jax.predict --exported exported/r50 --output results.json \
      image1.jpg image2.png

What is exported is the jitted detector ``inference.Predictor.forward``:
a preprocessed batch in (``image (B, H, W, 3) float32`` normalised and zero
padded at the bottom/right to the bucket ``H x W``, ``img_shape`` and
``pad_shape (B, 2) int32`` (h, w) after resizing / after /32 padding,
``scale_factor (B, 4) float32`` (w_s, h_s, w_s, h_s)), fixed-size outputs out
(``K = test.rcnn.max_per_img``): ``boxes (B, K, 4)`` x1,y1,x2,y2 in original
pixels, ``scores``, ``labels``, ``valid``, ``mask_logits (B, K, 28, 28)`` of
the label, ``mask_iou``, ``mask_iou_all (B, K, C)``, ``mask_scores``,
``paste_boxes`` (the boxes masks are pasted with, as mmdetection); padding
rows are zero and ``valid`` False. One program per bucket, for one batch
size. The weights are the programs' first argument (a flat list of arrays in
``weights.npz``), so the buckets share them. The directory layout and
``contract.json`` are described in ``msrcnn_jax.serving``, which runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from jax import export as jax_export
import jax.numpy as jnp
import ml_collections
import numpy as np

from msrcnn_jax import console
from msrcnn_jax import errors
from msrcnn_jax import serving
from msrcnn_jax.inference import Predictor

DTYPES = ('float32', 'bfloat16')


def parse_bucket(text: str, size_divisor: int = 32) -> tuple[int, int]:
  """``'800x1344'`` -> ``(800, 1344)``.

  Raises:
    ValueError: not ``HxW`` with positive multiples of ``size_divisor``.
  """
  try:
    h, w = (int(v) for v in text.lower().split('x'))
  except ValueError:
    raise ValueError(f'--bucket {text!r} is not HxW (e.g. 800x1344)') from None
  if h <= 0 or w <= 0 or h % size_divisor or w % size_divisor:
    raise ValueError(f'--bucket {text}: height and width must be positive '
                     f'multiples of {size_divisor} (config.data.size_divisor)')
  return h, w


def _input_specs(batch_size: int, bucket: Sequence[int]):
  b, (h, w) = int(batch_size), bucket
  return (jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
          jax.ShapeDtypeStruct((b, 2), jnp.int32),
          jax.ShapeDtypeStruct((b, 2), jnp.int32),
          jax.ShapeDtypeStruct((b, 4), jnp.float32))


def _describe(tree) -> dict[str, Any]:
  return {k: dict(shape=list(v.shape), dtype=str(v.dtype))
          for k, v in tree.items()}


def export_detector(config: ml_collections.ConfigDict, variables: Any,
                    output: str, batch_size: int = 1,
                    buckets: Sequence[Sequence[int]] | None = None,
                    dtype: str = 'float32',
                    platforms: Sequence[str] | None = None,
                    saved_model: bool = True) -> dict[str, Any]:
  """Writes an export directory (see ``msrcnn_jax.serving``).

  Args:
    config: the model config.
    variables: ``{'params': ..., 'batch_stats': ...}`` fitting ``config``.
    output: the directory to write (replaced atomically if it holds an
      earlier export).
    batch_size: images per call.
    buckets: ``(H, W)`` input shapes, one program each (default
      ``config.data.buckets``).
    dtype: compute dtype of convolutions and dense layers ('float32' or
      'bfloat16'; weights, inputs and outputs stay float32).
    platforms: what to lower for (e.g. ``('cpu', 'cuda')``); default the
      current backend.
    saved_model: also write the TensorFlow SavedModel (jax2tf).

  Returns:
    The contract (also written as ``contract.json``).

  Raises:
    ValueError: an unknown dtype, a non-positive batch size, or output
      is a non-empty directory that is not an export.
    errors.UserError: ``saved_model`` without TensorFlow installed.
  """
  if saved_model:
    try:
      with console.native_notices_hidden():   # TensorFlow's oneDNN notice
        import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise errors.UserError(
          f'the SavedModel needs TensorFlow ({e}): pip install '
          '"msrcnn-jax[export]" (or tensorflow-cpu), or pass '
          '--nosaved-model') from e
  if dtype not in DTYPES:
    raise ValueError(f'--dtype {dtype!r}: one of {DTYPES}')
  if batch_size <= 0:
    raise ValueError(f'--batch-size {batch_size} must be positive')
  d = config.data
  buckets = [tuple(int(v) for v in b) for b in (buckets or d.buckets)]
  platforms = tuple(platforms or (jax.default_backend(),))
  output = os.path.abspath(output)
  if os.path.isdir(output) and os.listdir(output) and not os.path.isfile(
      os.path.join(output, serving.CONTRACT_FILE)):
    raise ValueError(f'--output {output} is a non-empty directory that holds '
                     'no export; choose another or empty it')

  predictor = Predictor(config, variables, dtype=dtype)
  leaves, treedef = jax.tree.flatten(jax.device_get(variables))
  weights = [np.asarray(x) for x in leaves]

  def detector(weights, image, img_shape, pad_shape, scale_factor):
    return predictor.forward(jax.tree.unflatten(treedef, weights), image,
                             img_shape, pad_shape, scale_factor)

  contract = dict(
      format=serving.FORMAT,
      config_name=config.get('name', ''),
      batch_size=int(batch_size),
      dtype=dtype,
      platforms=list(platforms),
      buckets=[list(b) for b in buckets],
      programs={},
      weights=serving.WEIGHTS_FILE,
      num_weights=len(weights),
      saved_model=serving.SAVED_MODEL_DIR if saved_model else None,
      preprocess=dict(
          resize='keep ratio, mmcv rescale_size to img_scale (long, '
                 'short), cv2 INTER_LINEAR, from BGR uint8',
          img_scale=list(d.img_scale), mean=list(d.mean), std=list(d.std),
          to_rgb=bool(d.to_rgb), size_divisor=int(d.size_divisor),
          pad='zeros at the bottom/right to the bucket'),
      inputs={k: dict(shape=list(s.shape), dtype=str(s.dtype))
              for k, s in zip(('image', 'img_shape', 'pad_shape',
                               'scale_factor'),
                              _input_specs(batch_size, ('H', 'W')))},
      outputs=None,
      postprocess=dict(mask_thr_binary=float(
          config.test.rcnn.mask_thr_binary)),
      class_names=list(d.class_names),
      category_ids=[int(c) for c in d.category_ids])
  # The program carries its contract: its name holds the contract's digest
  # (serving.ExportedPredictor refuses a contract.json edited since).
  detector.__name__ = serving.PROGRAM_PREFIX + serving.contract_digest(
      json.loads(json.dumps(contract)))

  weight_specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)     # mkdtemp's is 0700
  try:
    np.savez(os.path.join(tmp, serving.WEIGHTS_FILE), *weights)
    programs, outputs = {}, None
    for bucket in buckets:
      specs = _input_specs(batch_size, bucket)
      exp = jax_export.export(jax.jit(detector), platforms=platforms)(
          weight_specs, *specs)
      name = serving.bucket_name(bucket)
      programs[name] = f'detector_{name}.stablehlo'
      with open(os.path.join(tmp, programs[name]), 'wb') as f:
        f.write(exp.serialize())
      outputs = jax.eval_shape(detector, weight_specs, *specs)
      logging.info('Exported bucket %s for %s', name, platforms)
    contract.update(programs=programs, outputs=_describe(outputs))
    with open(os.path.join(tmp, serving.CONTRACT_FILE), 'w') as f:
      json.dump(contract, f, indent=2)
    if saved_model:
      _write_saved_model(os.path.join(tmp, serving.SAVED_MODEL_DIR), detector,
                         weights, batch_size, buckets, platforms)
    if os.path.isdir(output):
      shutil.rmtree(output)
    os.replace(tmp, output)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return contract


def _write_saved_model(path: str, detector, weights, batch_size: int,
                       buckets, platforms) -> None:
  """The programs through jax2tf: signature ``detect_<H>x<W>`` per bucket
  (the first bucket is also ``serving_default``), inputs named as the
  contract's, the weights as TF variables."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  module = tf.Module()
  module.weights = [tf.Variable(w, trainable=False) for w in weights]
  tf_detector = jax2tf.convert(detector, with_gradient=False,
                               native_serialization_platforms=platforms)
  signatures = {}
  with _stablehlo_version_for_tensorflow():   # traced (serialized) here
    for bucket in buckets:
      specs = [tf.TensorSpec(s.shape, tf.dtypes.as_dtype(s.dtype), name=n)
               for s, n in zip(_input_specs(batch_size, bucket),
                               ('image', 'img_shape', 'pad_shape',
                                'scale_factor'))]
      fn = tf.function(
          lambda image, img_shape, pad_shape, scale_factor: tf_detector(
              module.weights, image, img_shape, pad_shape, scale_factor),
          input_signature=specs, autograph=False)
      name = f'detect_{serving.bucket_name(bucket)}'
      setattr(module, name, fn)
      signatures[name] = fn.get_concrete_function()
  signatures['serving_default'] = signatures[
      f'detect_{serving.bucket_name(buckets[0])}']
  tf.saved_model.save(module, path, signatures=signatures)


@contextlib.contextmanager
def _stablehlo_version_for_tensorflow():
  """Serializes StableHLO no newer than the installed TensorFlow reads.

  ``jax.export`` writes StableHLO of a version about 4 weeks older than
  JAX's own; TensorFlow's ``XlaCallModule`` op (what jax2tf's SavedModel
  holds) reads only up to TensorFlow's StableHLO version (1.13.7 in TF
  2.21, against 1.15.0 for jax 0.10.2, which writes ``composite_v2`` ops it
  cannot read). So for the SavedModel the older of the two is targeted.
  """
  from jax._src.export import _export  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo  # pylint: disable=g-import-not-at-top
  hlo = _export.hlo
  original = hlo.get_version_from_compatibility_requirement

  def older(requirement):
    return tf_stablehlo.get_smaller_version(
        original(requirement), tf_stablehlo.get_current_version())

  hlo.get_version_from_compatibility_requirement = older
  try:
    yield
  finally:
    hlo.get_version_from_compatibility_requirement = original


# --------------------------------------------------------------------- CLI
_CONFIG = None


def _define_flags():
  global _CONFIG
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Model config file (configs/<name>.py).')
  flags.DEFINE_string('checkpoint', None,
                      'Converted or trained checkpoint directory.')
  flags.DEFINE_string('output', None, 'Export directory to write.')
  flags.DEFINE_integer('batch-size', 1, 'Images per call.')
  flags.DEFINE_multi_string(
      'bucket', None, 'HxW input shape to export (repeatable; default the '
      "config's data.buckets).")
  flags.DEFINE_enum('dtype', 'float32', DTYPES,
                    'Compute dtype of convolutions and dense layers.')
  flags.DEFINE_list('platforms', None, 'Platforms to lower for, e.g. '
                    'cpu,cuda,tpu (default: the current backend).')
  flags.DEFINE_bool('saved-model', True,
                    'Also write a TensorFlow SavedModel (jax2tf).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  config = _CONFIG.value
  if config is None or f.checkpoint is None or f.output is None:
    raise app.UsageError('--config, --checkpoint and --output are required.')
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from msrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
  try:
    buckets = [parse_bucket(b, int(config.data.size_divisor))
               for b in (f.bucket or [])]
    variables, _ = build.load_checked_variables(config, f.checkpoint)
    contract = export_detector(
        config, variables, f.output, batch_size=f['batch-size'].value,
        buckets=buckets or None, dtype=f.dtype, platforms=f.platforms,
        saved_model=f['saved-model'].value)
  except (errors.UserError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'exported {", ".join(contract["programs"])} (batch '
        f'{contract["batch_size"]}, {contract["dtype"]}, '
        f'{",".join(contract["platforms"])}) -> {os.path.abspath(f.output)}')


if __name__ == '__main__':
  _define_flags()
  errors.run(main)
