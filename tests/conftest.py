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
