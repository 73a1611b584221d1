"""Shared test helpers: fixture paths and the narrowed configs of the fixture sets.

The fixture sets in ``tests/fixtures/mmdet`` were produced by mmdetection 2.28.2
(see its README). ``fixture_config(name)`` gives our config for the same
narrowed model.
"""

import json
import os

import numpy as np
import pytest

# Tests compile for the CPU only, also where the accelerator extra (CUDA
# plugin, libtpu) is installed; accelerator targets are compiled deviceless
# (tests/test_accelerator_compile.py). No persistent compilation cache: tests
# stay independent of earlier runs and of each other under -n 2.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('MSRCNN_COMPILATION_CACHE', '0')

from msrcnn_jax.config import ms_rcnn_config

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'mmdet')
SETS = ('r50_caffe_tiny', 'x101_pytorch_tiny', 'r50_caffe_tiny_fullscale')
SET_IMAGES = {
    'r50_caffe_tiny': ('chelsea', 'coffee'),
    'x101_pytorch_tiny': ('chelsea', 'coffee'),
    'r50_caffe_tiny_fullscale': ('stereo_motorcycle', 'logo_rgba'),
}


# Float32 parity tolerances per fixture set, from measured bounds
# (``python benchmarks/score_tolerance.py --draws 8``; BENCHMARKS.md, "Parity
# tolerances"). A float32 result is exact only to within its rounding
# error, and that error depends on the order in which the CPU's kernels add
# (vector width, oneDNN/Eigen blocking): a tolerance fitted to one machine's
# run fails on another (an AMD EPYC with AVX-512 put an x101 score 1.2e-4
# from mmdetection's). With our detector in float64 as the exact value,
# |ours - mmdetection| <= |ours - exact| + |mmdetection - exact|, and each
# bound below is that sum's worst case, rounded up:
#   mmdetection's own float32 error (fixed: its outputs are the fixtures)
#   + the largest float32 error of ours over 9 rounding paths (this CPU, and
#     8 draws of every parameter times (1 + u 2**-23), u uniform in [-1, 1],
#     standing in for other CPUs' summation orders; their errors have the
#     same median as mmdetection's and ours).
# The largest |ours - mmdetection| seen over those paths is 55-80% of each
# bound. Keys: ``score`` / ``mask_score`` (absolute, per matched detection),
# ``mask_iou`` (all 80 classes' MaskIoU, max |diff| / max |mmdetection|),
# ``shallow`` (C2, C3) and ``deep`` (C4, C5, P2-P6), relative like
# ``mask_iou``. The deep ResNeXt-101 amplifies rounding 5x more than R-50.
#   measured bound       score   mask_score  mask_iou  C2-C3   C4-P6
#   r50_caffe_tiny       8.5e-5  1.09e-4     1.38e-4   8.9e-6  9.9e-5
#   r50_caffe_tiny_full  1.18e-4 8.5e-5      6.4e-5    -       -
#   x101_pytorch_tiny    4.01e-4 3.34e-4     3.35e-4   9.9e-6  5.41e-4
PARITY_TOL = {
    'r50_caffe_tiny': dict(score=1e-4, mask_score=1.5e-4, mask_iou=1.5e-4,
                           shallow=1e-5, deep=1e-4),
    'r50_caffe_tiny_fullscale': dict(score=1.5e-4, mask_score=1e-4,
                                     mask_iou=1e-4),
    'x101_pytorch_tiny': dict(score=5e-4, mask_score=4e-4, mask_iou=4e-4,
                              shallow=1e-5, deep=6e-4),
}


def assert_one_error_line(proc, *needles):
  """A user error as the command-line contract wants it: exit status 1, no
  traceback, one ``error: ...`` line, the last non-empty line of stderr,
  naming every one of ``needles``. Returns that line."""
  err = proc.stderr
  assert proc.returncode == 1, (proc.returncode, err[-3000:])
  assert 'Traceback' not in err, err[-3000:]
  lines = [l for l in err.splitlines() if l.strip()]
  errs = [l for l in lines if l.startswith('error: ')]
  assert len(errs) == 1 and lines[-1] == errs[0], err[-3000:]
  for n in needles:
    assert n in errs[0], (n, errs[0])
  return errs[0]


def compilation_cache_env(tmp_path) -> dict:
  """Environment entries giving one test's subprocesses a compilation
  cache of their own (``tmp_path/jax_cache``): a later command of the same
  test (resume, predict after train) loads the programs the first one
  compiled, and no test depends on another's."""
  return {'MSRCNN_COMPILATION_CACHE': str(tmp_path / 'jax_cache')}


def mmdet_train_step_inputs(ref, train_cfg):
  """``(batch, sampled)`` for ``model.losses`` from a fixture's ``train.npz``
  (``ref``: its arrays): mmdetection's input and GT (full-image mask
  bitmaps, so each mask frame is the padded image), its RPN and R-CNN
  samples packed to ``train_cfg``'s sample counts, and its train-mode
  proposals."""
  from msrcnn_jax.ops.matching import pack_sampled  # pylint: disable=g-import-not-at-top
  _, _, h, w = ref['input'].shape
  g = len(ref['gt_labels'])
  batch = dict(
      image=ref['input'].transpose(0, 2, 3, 1),
      img_shape=ref['img_shape'][None, :2].astype(np.int32),
      pad_shape=ref['pad_shape'][None, :2].astype(np.int32),
      gt_boxes=ref['gt_bboxes'][None].astype(np.float32),
      gt_labels=ref['gt_labels'][None].astype(np.int32),
      gt_valid=np.ones((1, g), bool),
      gt_masks=ref['gt_masks'][None],
      gt_mask_frames=np.tile(np.array([[[0, 0, w, h]]], np.float32),
                             (1, g, 1)))
  rpn = pack_sampled(ref['rpn.sample.pos_inds'], ref['rpn.sample.neg_inds'],
                     train_cfg.rpn.num_samples)
  rcnn = pack_sampled(ref['rcnn.sample.pos_inds'],
                      ref['rcnn.sample.neg_inds'], train_cfg.rcnn.num_samples)
  props = ref['rpn.proposals.0'][None, :, :4]
  sampled = dict(
      rpn=tuple(a[None] for a in rpn), rcnn=tuple(a[None] for a in rcnn),
      proposals=props, proposal_valid=np.ones(props.shape[:2], bool))
  return batch, sampled


def fixture_path(*parts):
  return os.path.join(FIXTURES, *parts)


def load_npz(set_name, image):
  """The mmdetection stage outputs of one image, as a dict of arrays."""
  with np.load(fixture_path(set_name, f'{image}.npz')) as d:
    return {k: d[k] for k in d.files}


def load_results(set_name):
  with open(fixture_path(set_name, 'results.json')) as f:
    return json.load(f)


def fixture_config(set_name):
  """Our config for a fixture set, narrowed exactly as its config.json says."""
  with open(fixture_path(set_name, 'config.json')) as f:
    ref = json.load(f)
  bb = ref['model']['backbone']
  groups = bb.get('groups', 1)
  cfg = ms_rcnn_config(
      name=ref['name'], depth=bb['depth'], style=bb['style'], groups=groups,
      base_width=bb.get('base_width', 64))
  m = cfg.model
  m.backbone.base_channels = bb['base_channels']
  m.neck.in_channels = list(ref['model']['neck']['in_channels'])
  fpn = ref['model']['neck']['out_channels']
  m.neck.out_channels = fpn
  m.rpn_head.feat_channels = fpn
  rh = ref['model']['roi_head']
  fc = rh['bbox_head']['fc_out_channels']
  m.roi_head.bbox_head.fc_out_channels = fc
  m.roi_head.mask_head.conv_out_channels = rh['mask_head']['conv_out_channels']
  m.roi_head.mask_iou_head.conv_out_channels = (
      rh['mask_iou_head']['conv_out_channels'])
  m.roi_head.mask_iou_head.fc_out_channels = (
      rh['mask_iou_head']['fc_out_channels'])
  scale = [p for p in ref['test_pipeline'] if p['type'] == 'MultiScaleFlipAug']
  cfg.data.img_scale = tuple(scale[0]['img_scale'])
  long, short = (-(-v // 32) * 32 for v in cfg.data.img_scale)
  cfg.data.buckets = ((short, long), (long, short), (short, short))
  return cfg


@pytest.fixture(params=('r50_caffe_tiny', 'x101_pytorch_tiny'))
def tiny_set(request):
  """The two fixture sets that have dense maps and train.npz."""
  return request.param
