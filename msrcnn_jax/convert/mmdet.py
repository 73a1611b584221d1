"""mmdetection 2.x state_dict -> Flax variables: a rename table + transposes.

Naming rule (CONTRACTS.md): split the key on '.', merge every numeric
component into the previous one with '_', rename the leaf: conv/linear
``weight`` -> ``kernel`` (OIHW -> HWIO, [out, in] -> [in, out];
``mask_head.upsample`` [in, out, 2, 2] -> (2, 2, in, out)), BN ``weight`` ->
``scale``, ``running_mean``/``running_var`` -> 'batch_stats' ``mean``/``var``;
``num_batches_tracked`` is dropped.

Loading is strict (unlike mmcv's ``load_checkpoint``, spec §4): every missing,
unexpected and mis-shaped tensor is listed and conversion fails with
``ConversionError`` unless everything maps. 2019 v1.x checkpoints (spec §4.3)
are refused with an explanation. Mask R-CNN checkpoints (no
``roi_head.mask_iou_head.*``) convert with a ``StandardRoIHead`` config; a
checkpoint of the other family is named as such (``family_note``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from msrcnn_jax import config as config_lib
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.errors import UserError
from msrcnn_jax.modeling import build
from msrcnn_jax.modeling.backbone import STAGE_BLOCKS

Shape = Tuple[int, ...]

V1_MESSAGE = (
    'This is a 2019 mmdetection v1.x checkpoint ({why}). v1 models use 81 '
    'classes with background at index 0 and need the legacy pieces of '
    "mmdetection's configs/legacy_1.x (LegacyAnchorGenerator with "
    'center_offset=0.5 and rounding, LegacyDeltaXYWHBBoxCoder with +1 '
    'widths, RoIAlign(aligned=False, sampling_ratio=2)), which msrcnn_jax '
    'does not implement (spec §4.3, §5.1). Use the v2 model-zoo checkpoint '
    '(2020 or later) of the same model instead.')


class ConversionError(UserError, ValueError):
  """Raised when a checkpoint does not map exactly; ``report`` says why."""

  def __init__(self, message: str, report: Optional['ConversionReport'] = None):
    self.report = report
    if report is not None:
      message = f'{message}\n{report.format()}'
    super().__init__(message)


@dataclasses.dataclass
class ConversionReport:
  """What a conversion mapped, ignored and could not map.

  ``mapped`` / ``mis_shaped`` rows are (torch key, flax path, torch shape,
  flax shape); for ``mis_shaped`` the flax shape is the expected one and the
  torch shape is given after the layout transpose in brackets.
  """
  source: str = ''
  mapped: List[Tuple[str, str, Shape, Shape]] = dataclasses.field(
      default_factory=list)
  ignored: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)
  unexpected: List[str] = dataclasses.field(default_factory=list)
  mis_shaped: List[Tuple[str, str, Shape, Shape]] = dataclasses.field(
      default_factory=list)
  filled: List[str] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mis_shaped)

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(dst)) for _, path, _, dst in self.mapped
               if path.startswith('params/'))

  @property
  def num_ignored_batches_tracked(self) -> int:
    return sum(k.endswith('num_batches_tracked') for k in self.ignored)

  def format(self) -> str:
    lines = []
    if self.source:
      lines.append(f'source: {self.source}')
    lines.extend(f'note: {n}' for n in self.notes)
    lines.append(f'tensors mapped: {len(self.mapped)} '
                 f'({self.num_params:,} parameters in params)')
    lines.append(f'ignored: {len(self.ignored)} (num_batches_tracked: '
                 f'{self.num_ignored_batches_tracked})')
    other = [k for k in self.ignored if not k.endswith('num_batches_tracked')]
    for k in other:
      lines.append(f'  ignored: {k}')
    for p in self.filled:
      lines.append(f'  filled with defaults: {p}')
    lines.append(f'missing: {len(self.missing)}')
    lines.extend(f'  missing: {p}' for p in self.missing)
    lines.append(f'unexpected: {len(self.unexpected)}')
    lines.extend(f'  unexpected: {k}' for k in self.unexpected)
    lines.append(f'mis-shaped: {len(self.mis_shaped)}')
    lines.extend(f'  mis-shaped: {k} -> {p}: checkpoint {tuple(s)} vs '
                 f'model {tuple(e)}' for k, p, s, e in self.mis_shaped)
    return '\n'.join(lines)


# ------------------------------------------------------------ expected tree


def expected_variable_shapes(config, backbone_only: bool = False
                            ) -> Dict[str, Shape]:
  """Every variable of the detector for ``config`` (``jax.eval_shape``).

  Args:
    config: the full config (``ms_rcnn_config``).
    backbone_only: only the ``backbone`` subtree.

  Returns:
    ``{'params/backbone/conv1/kernel': (7, 7, 3, 64), ...,
    'batch_stats/backbone/bn1/mean': (64,), ...}``.
  """
  shapes = _expected_shapes(config.model.to_json())
  if backbone_only:
    return {k: v for k, v in shapes.items() if k.split('/')[1] == 'backbone'}
  return dict(shapes)


@functools.lru_cache(maxsize=32)
def _expected_shapes(model_json: str) -> Dict[str, Shape]:
  """The spine's variable shapes for a ``config.model`` (as JSON)."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(json.loads(model_json))
  return variables_lib.shapes(build.variable_shapes(config))


# ---------------------------------------------------------------- renaming


def mmdet_key_to_path(key: str, ndim: int) -> Optional[str]:
  """``'backbone.layer1.0.downsample.0.weight'`` (4-d) ->
  ``'params/backbone/layer1_0/downsample_0/kernel'``.

  Returns None for ``num_batches_tracked`` (dropped).
  """
  parts = key.split('.')
  leaf, mods = parts[-1], []
  for p in parts[:-1]:
    if p.isdigit() and mods:
      mods[-1] = f'{mods[-1]}_{p}'
    else:
      mods.append(p)
  if leaf == 'num_batches_tracked':
    return None
  if leaf == 'weight':
    col, leaf = 'params', ('scale' if ndim == 1 else 'kernel')
  elif leaf == 'bias':
    col = 'params'
  elif leaf in ('running_mean', 'running_var'):
    col, leaf = 'batch_stats', leaf[len('running_'):]
  else:
    col = 'params'
  return '/'.join([col] + mods + [leaf])


def torch_to_flax_layout(path: str, array: np.ndarray) -> np.ndarray:
  """Applies the layout transpose for a kernel at ``path``; else identity."""
  if not path.endswith('/kernel'):
    return array
  if array.ndim == 4:
    if path.endswith('mask_head/upsample/kernel'):
      return np.transpose(array, (2, 3, 0, 1))  # [in,out,kh,kw] -> kh,kw,in,out
    return np.transpose(array, (2, 3, 1, 0))    # OIHW -> HWIO
  if array.ndim == 2:
    return array.T                              # [out,in] -> [in,out]
  return array


def _layout_shape(path: str, shape: Shape) -> Shape:
  """The shape ``torch_to_flax_layout`` gives an array of ``shape``."""
  if not path.endswith('/kernel'):
    return tuple(shape)
  if len(shape) == 4:
    perm = ((2, 3, 0, 1) if path.endswith('mask_head/upsample/kernel')
            else (2, 3, 1, 0))
    return tuple(shape[i] for i in perm)
  if len(shape) == 2:
    return tuple(shape[::-1])
  return tuple(shape)


# -------------------------------------------------------------- diagnosis


_CLASS_ROWS = {  # key: (rows per class, extra rows) in a v2 model
    'roi_head.bbox_head.fc_cls.weight': (1, 1),       # + background
    'roi_head.bbox_head.fc_reg.weight': (4, 0),       # class-specific boxes
    'roi_head.mask_head.conv_logits.weight': (1, 0),
    'roi_head.mask_iou_head.fc_mask_iou.weight': (1, 0),
}


def checkpoint_num_classes(shapes: Mapping[str, Shape]) -> Dict[str, int]:
  """The class count each class-dependent head layer implies (v2 layout).

  Returns:
    ``{key: num_classes}`` for the keys of ``_CLASS_ROWS`` present, e.g.
    fc_cls with 82 rows -> 81 (background is the last row in v2).
  """
  out = {}
  for key, (per, extra) in _CLASS_ROWS.items():
    if key in shapes and len(shapes[key]) and (shapes[key][0] - extra) % per \
        == 0:
      out[key] = (shapes[key][0] - extra) // per
  return out


def detect_v1_layout(shapes: Mapping[str, Shape],
                     meta: Any = None) -> Optional[str]:
  """Why a checkpoint is an mmdetection v1.x model, or None if it is not.

  From keys and metadata, never from a class count alone (a v2 model
  fine-tuned on 81 classes has 81-way heads too): top-level
  ``bbox_head.*`` / ``mask_head.*`` / ``mask_iou_head.*`` keys (v1 layout);
  ``meta['mmdet_version']`` below 2; or mmdetection's
  ``upgrade_model_version.py`` output, whose ``fc_mask_iou`` it leaves with
  the v1 background row (as many rows as ``fc_cls``, one more than
  ``conv_logits``).

  Args:
    shapes: ``{key: shape}`` without a ``module.`` prefix.
    meta: the checkpoint's ``meta`` dict, if any.
  """
  top = sorted({k.split('.')[0] for k in shapes
                if k.split('.')[0] in ('bbox_head', 'mask_head',
                                       'mask_iou_head')})
  if top:
    return f"top-level {', '.join(t + '.*' for t in top)} keys without the " \
           "'roi_head.' prefix"
  version = meta.get('mmdet_version') if isinstance(meta, Mapping) else None
  major = re.match(r'\s*(\d+)\.', str(version)) if version else None
  if major and int(major.group(1)) < 2:
    return f"meta mmdet_version {version!r}"
  rows = {k: s[0] for k, s in shapes.items() if k in _CLASS_ROWS and len(s)}
  cls = rows.get('roi_head.bbox_head.fc_cls.weight')
  iou = rows.get('roi_head.mask_iou_head.fc_mask_iou.weight')
  logits = rows.get('roi_head.mask_head.conv_logits.weight')
  if iou is not None and iou == cls and (logits is None or logits == iou - 1):
    return (f'{iou}-way fc_mask_iou beside {cls}-row fc_cls: '
            'upgrade_model_version.py leaves fc_mask_iou with its v1 '
            'background row')
  return None


def infer_architecture(shapes: Mapping[str, Shape],
                       prefix: str = 'backbone.') -> Dict[str, Any]:
  """Backbone depth, groups, base_channels and FPN/FC widths from shapes."""
  arch: Dict[str, Any] = {}
  blocks = {int(m.group(1)) for k in shapes
            for m in [re.match(re.escape(prefix) + r'layer3\.(\d+)\.', k)] if m}
  if blocks:
    n = max(blocks) + 1
    arch['depth'] = {b[2]: d for d, b in STAGE_BLOCKS.items()}.get(n)
    arch['layer3_blocks'] = n
  if prefix + 'conv1.weight' in shapes:
    arch['base_channels'] = shapes[prefix + 'conv1.weight'][0]
  conv2 = shapes.get(prefix + 'layer1.0.conv2.weight')
  if conv2 is not None and conv2[1]:
    arch['groups'] = conv2[0] // conv2[1]
  lat = shapes.get('neck.lateral_convs.0.conv.weight')
  if lat is not None:
    arch['fpn_channels'] = lat[0]
  fc = shapes.get('roi_head.bbox_head.shared_fcs.0.weight')
  if fc is not None:
    arch['fc_out_channels'] = fc[0]
  return arch


def _config_architecture(config) -> Dict[str, Any]:
  m = config.model if hasattr(config, 'model') else config
  return dict(depth=m.backbone.depth, base_channels=m.backbone.base_channels,
              groups=m.backbone.groups,
              layer3_blocks=STAGE_BLOCKS.get(m.backbone.depth, (0,) * 4)[2],
              fpn_channels=m.neck.out_channels,
              fc_out_channels=m.roi_head.bbox_head.fc_out_channels)


def _describe(arch: Mapping[str, Any]) -> str:
  kind = 'ResNeXt' if arch.get('groups', 1) > 1 else 'ResNet'
  s = f"{kind}-{arch.get('depth', '?')}"
  if kind == 'ResNeXt':
    s += f" (groups {arch.get('groups')})"
  return s + f", base_channels {arch.get('base_channels', '?')}"


def _class_count_note(shapes: Mapping[str, Shape], config,
                      meta: Any = None) -> List[str]:
  """The checkpoint-vs-config class-count difference, if any."""
  per_key = checkpoint_num_classes(shapes)
  m = config.model if hasattr(config, 'model') else config
  want = int(m.num_classes)
  counts = sorted(set(per_key.values()))
  if not counts or counts == [want]:
    return []
  rows = ', '.join(f'{k.split(".")[-2]} {shapes[k][0]}' for k in per_key)
  names = meta.get('CLASSES') if isinstance(meta, Mapping) else None
  named = (f'; meta CLASSES lists {len(names)} names'
           if isinstance(names, (list, tuple)) else '')
  got = ' / '.join(map(str, counts))
  return [f'checkpoint/config mismatch: the checkpoint\'s heads are for {got} '
          f'classes ({rows} rows{named}) but the config builds heads for '
          f'{want} classes. Convert it with a config of {got} classes (to '
          'fine-tune on another class count, start training from that '
          'conversion).']


def family_note(shapes: Mapping[str, Shape], config) -> List[str]:
  """The model-family difference, if any: a Mask Scoring R-CNN checkpoint
  (``roi_head.mask_iou_head.*`` keys) with a Mask R-CNN config
  (``model.roi_head.type='StandardRoIHead'``), or a Mask R-CNN checkpoint
  (``roi_head.mask_head.*`` but no ``roi_head.mask_iou_head.*`` keys) with an
  MS R-CNN config. ``shapes`` keys have no ``module.`` prefix."""
  iou_keys = [k for k in shapes if k.startswith('roi_head.mask_iou_head.')]
  has_mask = any(k.startswith('roi_head.mask_head.') for k in shapes)
  if iou_keys and not config_lib.has_mask_iou_head(config):
    return ['checkpoint/config mismatch: the checkpoint is a Mask Scoring '
            f'R-CNN ({len(iou_keys)} roi_head.mask_iou_head.* tensors) but '
            'the config builds a Mask R-CNN (model.roi_head.type='
            "'StandardRoIHead', no MaskIoU head). Use the ms_rcnn_* config "
            'that matches the checkpoint.']
  if has_mask and not iou_keys and config_lib.has_mask_iou_head(config):
    return ['checkpoint/config mismatch: the checkpoint is a Mask R-CNN (no '
            'roi_head.mask_iou_head.* tensors) but the config builds a Mask '
            "Scoring R-CNN (model.roi_head.type='MaskScoringRoIHead'). Use "
            'the mask_rcnn_* config that matches the checkpoint (a MaskIoU '
            'head is not in it: one has to be trained).']
  return []


def diagnose_mismatch(shapes: Mapping[str, Shape], config,
                      prefix: str = 'backbone.', meta: Any = None
                      ) -> List[str]:
  """Human-readable checkpoint-vs-config differences (empty if none seen):
  the model family (``family_note``), backbone/neck/head widths, then the
  class count."""
  got = infer_architecture(shapes, prefix)
  want = _config_architecture(config)
  diffs = [k for k in ('depth', 'layer3_blocks', 'groups', 'base_channels',
                       'fpn_channels', 'fc_out_channels')
           if k in got and got[k] != want[k]]
  notes = family_note(shapes, config)
  if diffs:
    notes.append(
        f'checkpoint/config mismatch: the checkpoint is {_describe(got)} '
        f'but the config builds {_describe(want)}; differing: ' +
        ', '.join(f'{k} {got[k]} (checkpoint) vs {want[k]} (config)'
                  for k in diffs) + '. Use the config that matches the '
        'checkpoint.')
  return notes + _class_count_note(shapes, config, meta)


def parse_meta_backbone(meta: Any) -> Dict[str, Any]:
  """type/depth/style/groups of ``meta['config']`` (mmdet config text)."""
  text = meta.get('config') if isinstance(meta, Mapping) else None
  if not isinstance(text, str):
    return {}
  start = text.find('backbone=dict(')
  if start < 0:
    return {}
  depth, end = 0, start + len('backbone=dict(') - 1
  for end in range(end, len(text)):
    depth += {'(': 1, ')': -1}.get(text[end], 0)
    if depth == 0:
      break
  block = text[start:end + 1]
  out = {}
  for key, pat, cast in (('type', r"type='(\w+)'", str),
                         ('depth', r'\bdepth=(\d+)', int),
                         ('style', r"\bstyle='(\w+)'", str),
                         ('groups', r'\bgroups=(\d+)', int)):
    found = re.search(pat, block)
    if found:
      out[key] = cast(found.group(1))
  return out


def check_meta(meta: Any, config) -> List[str]:
  """Style/depth/groups differences between a checkpoint's meta config text
  and ``config`` (shapes cannot tell caffe from pytorch style, spec §5.3)."""
  got = parse_meta_backbone(meta)
  m = config.model if hasattr(config, 'model') else config
  want = dict(depth=m.backbone.depth, style=m.backbone.style,
              groups=m.backbone.groups)
  if 'groups' not in got and got.get('type') == 'ResNet':
    got['groups'] = 1
  diffs = [k for k in ('depth', 'style', 'groups')
           if k in got and got[k] != want[k]]
  if not diffs:
    return []
  msg = ('checkpoint/config mismatch: the checkpoint\'s meta config has '
         + ', '.join(f'{k}={got[k]!r}' for k in diffs) + ' but the config '
         'has ' + ', '.join(f'{k}={want[k]!r}' for k in diffs))
  if 'style' in diffs:
    msg += (' (caffe and pytorch style differ only in where the stride sits, '
            'so the weights would load and every feature be wrong, spec '
            '§5.3)')
  return [msg + '.']


# -------------------------------------------------------------- conversion


def _normalise_keys(shapes: Mapping[str, Any], backbone_only: bool,
                    report: ConversionReport) -> Dict[str, str]:
  """{our mmdet-style key: original key}; strips 'module.', handles
  backbone-only key sets (torchvision/mmcv ImageNet, detectron2 caffe)."""
  keys = {}
  for k in shapes:
    nk = k[len('module.'):] if k.startswith('module.') else k
    keys[nk] = k
  if not backbone_only:
    return keys
  if any(k.startswith('backbone.') for k in keys):
    # A detector checkpoint: take its backbone, ignore the rest.
    out = {}
    for k, orig in keys.items():
      if k.startswith('backbone.'):
        out[k] = orig
      else:
        report.ignored.append(orig)
    return out
  out = {}
  for k, orig in keys.items():
    if k.startswith('fc.'):  # the ImageNet classifier
      report.ignored.append(orig)
    else:
      out['backbone.' + k] = orig
  return out


def plan_conversion(shapes: Mapping[str, Sequence[int]], config, *,
                    backbone_only: bool = False, meta: Any = None,
                    source: str = '') -> ConversionReport:
  """Maps checkpoint key shapes onto the model; nothing is copied.

  Args:
    shapes: ``{torch key: torch shape}`` of a state_dict.
    config: our config (full or ``model`` node).
    backbone_only: map an ImageNet / detector backbone onto ``backbone``.
    meta: the checkpoint's ``meta`` (for the style check), optional.
    source: file name for the report.

  Returns:
    The report; ``report.ok`` is False on any problem.
  """
  report = ConversionReport(source=source)
  shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
  why = None if backbone_only else detect_v1_layout(
      {(k[7:] if k.startswith('module.') else k): s
       for k, s in shapes.items()}, meta)
  if why:
    raise ConversionError(V1_MESSAGE.format(why=why) +
                          (f' (file: {source})' if source else ''))
  keys = _normalise_keys(shapes, backbone_only, report)
  expected = expected_variable_shapes(config, backbone_only)
  seen = set()
  for key, orig in keys.items():
    shape = shapes[orig]
    path = mmdet_key_to_path(key, len(shape))
    if path is None:
      report.ignored.append(orig)
      continue
    if path not in expected:
      report.unexpected.append(orig)
      continue
    seen.add(path)
    flax_shape = _layout_shape(path, shape)
    if flax_shape != expected[path]:
      report.mis_shaped.append((orig, path, flax_shape, expected[path]))
    else:
      report.mapped.append((orig, path, shape, flax_shape))
  missing = [p for p in expected if p not in seen]
  if backbone_only:
    # detectron2-converted caffe weights may lack BN statistics: a frozen
    # affine layer, i.e. mean 0, var 1 (what detectron2's FrozenBN loads).
    for p in list(missing):
      if p.startswith('batch_stats/') and (
          'params' + p[len('batch_stats'):].rsplit('/', 1)[0] + '/scale'
          in seen):
        report.filled.append(p)
        missing.remove(p)
  report.missing = missing
  if not report.ok:
    report.notes.extend(diagnose_mismatch(
        {k: shapes[o] for k, o in keys.items()}, config, meta=meta))
  if meta is not None and not backbone_only:
    report.notes.extend(check_meta(meta, config))
  return report


def convert_state_dict(state_dict: Mapping[str, Any], config, *,
                       backbone_only: bool = False, meta: Any = None,
                       source: str = ''
                       ) -> Tuple[Dict[str, Any], ConversionReport]:
  """Converts an mmdetection state_dict into Flax variables, strictly.

  Args:
    state_dict: ``{key: array}`` (numpy or torch tensors), as in the
      checkpoint's ``state_dict`` (a 'module.' prefix is stripped).
    config: our config for the same model.
    backbone_only: see ``plan_conversion``; returns only ``backbone``.
    meta: the checkpoint's ``meta``; its config text is checked against
      ``config`` (style, depth, groups).
    source: file name for messages.

  Returns:
    ``({'params': {...}, 'batch_stats': {...}}, report)`` with float32 numpy
    arrays in our layouts.

  Raises:
    ConversionError: with the full report if anything does not map, if the
      checkpoint is a v1.x model, or if meta says a different architecture.
  """
  arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
  report = plan_conversion({k: v.shape for k, v in arrays.items()}, config,
                           backbone_only=backbone_only, meta=meta,
                           source=source)
  mismatch = [n for n in report.notes if 'mismatch' in n]
  if not report.ok or mismatch:
    raise ConversionError(
        'checkpoint does not match the model' +
        (f' ({source})' if source else '') +
        (f': {mismatch[0]}' if mismatch else ''), report)
  variables: Dict[str, Any] = {}
  for orig, path, _, _ in report.mapped:
    _set(variables, path,
         torch_to_flax_layout(path, arrays[orig]).astype(np.float32))
  expected = expected_variable_shapes(config, backbone_only)
  for path in report.filled:
    fill = np.zeros if path.endswith('/mean') else np.ones
    _set(variables, path, fill(expected[path], np.float32))
  return variables, report


def _set(tree: Dict[str, Any], path: str, value: np.ndarray):
  *mods, leaf = path.split('/')
  for m in mods:
    tree = tree.setdefault(m, {})
  tree[leaf] = np.ascontiguousarray(value)


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, 'detach'):
    v = v.detach().cpu().numpy()
  return np.asarray(v)


# ---------------------------------------------------------------- loading


def load_torch_checkpoint(path: str) -> Tuple[Dict[str, np.ndarray], Any]:
  """Reads an mmdetection / mmcv / torchvision ``.pth``.

  Handles torch zip and legacy (pre-1.6) files, a nested ``state_dict`` (or
  ``model``) or a flat dict, and a ``module.`` prefix (stripped later).

  Returns:
    ``(state_dict as numpy arrays, meta or None)``.

  Raises:
    ConversionError: naming the file if it is missing, truncated or not a
      checkpoint.
  """
  import torch  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise ConversionError(f'checkpoint file not found: {path}')
  try:
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    weights_only_refusal = (isinstance(e, pickle.UnpicklingError) and
                            'eights only' in str(e))
    if not weights_only_refusal:
      raise ConversionError(
          f'cannot read checkpoint {path}: corrupt, truncated or not a torch '
          f'file ({type(e).__name__}: {e})') from e
    # Older checkpoints may pickle non-tensor metadata (e.g. numpy scalars)
    # that the safe loader refuses; only load files you trust.
    try:
      ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e2:  # pylint: disable=broad-except
      raise ConversionError(
          f'cannot read checkpoint {path}: corrupt or truncated '
          f'({type(e2).__name__}: {e2})') from e2
  if not isinstance(ckpt, Mapping):
    raise ConversionError(f'{path} holds a {type(ckpt).__name__}, not a '
                          'state_dict or checkpoint dict')
  meta = ckpt.get('meta') if isinstance(ckpt.get('meta'), Mapping) else None
  sd = ckpt
  for k in ('state_dict', 'model'):
    if isinstance(ckpt.get(k), Mapping):
      sd = ckpt[k]
      break
  arrays = {}
  for k, v in sd.items():
    if not hasattr(v, 'shape'):
      raise ConversionError(f'{path}: entry {k!r} is a {type(v).__name__}, '
                            'not a tensor; not a state_dict')
    arrays[k] = _to_numpy(v)
  if not arrays:
    raise ConversionError(f'{path}: empty state_dict')
  return arrays, meta


def convert_checkpoint(path: str, config, *, backbone_only: bool = False
                       ) -> Tuple[Dict[str, Any], ConversionReport]:
  """``load_torch_checkpoint`` + ``convert_state_dict``."""
  sd, meta = load_torch_checkpoint(path)
  return convert_state_dict(sd, config, backbone_only=backbone_only,
                            meta=meta, source=path)
