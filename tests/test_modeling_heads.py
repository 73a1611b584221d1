"""RoI heads against mmdetection 2.28.2 fixtures (spec §1.6, §5.6, §5.7).

Inputs are mmdetection's own RoIAlign outputs, so only the heads are tested.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import fixture_config, fixture_path, load_npz
from msrcnn_jax.convert import mmdet
from msrcnn_jax.modeling.heads.box_head import Shared2FCBBoxHead
from msrcnn_jax.modeling.heads.mask_head import ConvTranspose2x2, FCNMaskHead
from msrcnn_jax.modeling.heads.maskiou_head import MaskIoUHead

TOL = 1e-4
SETS = ['r50_caffe_tiny', 'x101_pytorch_tiny']


@functools.lru_cache(maxsize=None)
def _variables(set_name):
  cfg = fixture_config(set_name)
  variables, _ = mmdet.convert_checkpoint(
      fixture_path(set_name, 'checkpoint.pth'), cfg)
  return cfg, variables['params']['roi_head']


def _rel(a, ref):
  return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize('set_name', SETS)
@pytest.mark.parametrize('image', ['chelsea', 'coffee'])
def test_box_head_matches_mmdet(set_name, image):
  cfg, params = _variables(set_name)
  ref = load_npz(set_name, image)
  feats = ref['bbox_roi_feats'].transpose(0, 2, 3, 1)  # (50, 7, 7, C)
  n = feats.shape[0]
  head = Shared2FCBBoxHead(cfg.model.roi_head.bbox_head.fc_out_channels)
  cls, deltas = jax.jit(head.apply)({'params': params['bbox_head']},
                                    jnp.asarray(feats))
  assert cls.shape == (n, 81) and deltas.shape == (n, 320)
  assert _rel(cls, ref['bbox_cls_score'][:n]) <= TOL
  assert _rel(deltas, ref['bbox_pred'][:n]) <= TOL
  # Leading batch axes are kept: (B, R, 7, 7, C) -> (B, R, 81).
  batched = jnp.asarray(feats).reshape((2, n // 2) + feats.shape[1:])
  cls2, _ = head.apply({'params': params['bbox_head']}, batched)
  np.testing.assert_allclose(np.asarray(cls2).reshape(n, 81),
                             np.asarray(cls), rtol=0, atol=1e-5)


@pytest.mark.parametrize('set_name', SETS)
@pytest.mark.parametrize('image', ['chelsea', 'coffee'])
def test_mask_and_maskiou_heads_match_mmdet(set_name, image):
  cfg, params = _variables(set_name)
  rh = cfg.model.roi_head
  ref = load_npz(set_name, image)
  feats = ref['mask_roi_feats'].transpose(0, 2, 3, 1)  # (<=20, 14, 14, C)
  k = feats.shape[0]
  labels = ref['det_labels'][:k].astype(np.int64)
  mask_head = FCNMaskHead(rh.mask_head.num_convs,
                          rh.mask_head.conv_out_channels,
                          cfg.model.num_classes)
  logits = jax.jit(mask_head.apply)({'params': params['mask_head']},
                                    jnp.asarray(feats))
  assert logits.shape == (k, 28, 28, 80)
  picked = np.asarray(logits)[np.arange(k), :, :, labels]  # (k, 28, 28)
  assert _rel(picked, ref['mask_pred'][:k]) <= TOL

  ih = rh.mask_iou_head
  iou_head = MaskIoUHead(ih.num_convs, ih.num_fcs, ih.conv_out_channels,
                         ih.fc_out_channels, cfg.model.num_classes)
  iou = jax.jit(iou_head.apply)({'params': params['mask_iou_head']},
                                jnp.asarray(feats), jnp.asarray(picked))
  assert iou.shape == (k, 80)
  assert _rel(iou, ref['mask_iou_pred'][:k]) <= TOL
  # And from mmdetection's own logits.
  iou_ref_in = iou_head.apply({'params': params['mask_iou_head']},
                              jnp.asarray(feats),
                              jnp.asarray(ref['mask_pred'][:k]))
  assert _rel(iou_ref_in, ref['mask_iou_pred'][:k]) <= TOL


def test_conv_transpose_matches_torch():
  """in != out so a swapped or flipped kernel cannot pass (spec §5.7)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 4, 6)).astype(np.float32)   # NHWC, C_in 6
  torch_layer = torch.nn.ConvTranspose2d(6, 7, kernel_size=2, stride=2)
  with torch.no_grad():
    want = torch_layer(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  weight = torch_layer.weight.detach().numpy()                # [in, out, 2, 2]
  kernel = mmdet.torch_to_flax_layout('params/roi_head/mask_head/upsample/'
                                      'kernel', weight)
  assert kernel.shape == (2, 2, 6, 7)
  out = ConvTranspose2x2(7).apply(
      {'params': {'kernel': kernel,
                  'bias': torch_layer.bias.detach().numpy()}}, x)
  assert out.shape == (3, 10, 8, 7)
  np.testing.assert_allclose(np.asarray(out), want.transpose(0, 2, 3, 1),
                             rtol=1e-5, atol=1e-5)
