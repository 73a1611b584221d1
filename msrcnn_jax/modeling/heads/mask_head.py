"""FCNMaskHead: 4 convs, 2x deconv, per-class 1x1 logits (spec §1.6, §5.7),
with its training targets (``mask_targets``) and loss (``mask_loss``).

Params: ``convs_i/conv`` (3x3, pad 1, bias, ReLU), ``upsample`` (kernel
``(2, 2, in, out)``, bias), ``conv_logits`` (1x1, 80 outputs).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrcnn_jax.modeling import layers
from msrcnn_jax.ops.boxes import clip_boxes
from msrcnn_jax.ops.losses import bce_with_logits
from msrcnn_jax.ops.masks import crop_geometry
from msrcnn_jax.ops.roi_align import roi_align


class ConvTranspose2x2(nn.Module):
  """``nn.ConvTranspose2d(in, out, kernel_size=2, stride=2)``.

  With kernel = stride = 2 the output windows do not overlap:
  ``out[2i+a, 2j+b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o]``,
  where ``kernel[a, b, c, o]`` = torch ``weight[c, o, a, b]`` (spec §5.7).
  Done by einsum + reshape: no kernel flip or in/out swap to get wrong.

  Attributes:
    features: output channels.
    dtype: computation dtype.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``(B, H, W, C) -> (B, 2H, 2W, features)``."""
    n, h, w, c = x.shape
    kernel = self.param('kernel', layers.KAIMING_FAN_OUT,
                        (2, 2, c, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,),
                      jnp.float32)
    y = jnp.einsum('nijc,abco->niajbo', x.astype(self.dtype),
                   kernel.astype(self.dtype))
    y = y.reshape(n, 2 * h, 2 * w, self.features)
    return y + bias.astype(self.dtype)


class FCNMaskHead(nn.Module):
  """Mask head of MS R-CNN.

  Attributes:
    num_convs: 3x3 convs before the upsample (4).
    conv_out_channels: their width (256).
    num_classes: mask logit channels (80, class-specific).
    dtype: computation dtype.
  """
  num_convs: int = 4
  conv_out_channels: int = 256
  num_classes: int = 80
  dtype: Any = jnp.float32

  def setup(self):
    self.convs = [layers.ConvModule(self.conv_out_channels, 3,
                                    dtype=self.dtype)
                  for _ in range(self.num_convs)]
    self.upsample = ConvTranspose2x2(self.conv_out_channels, self.dtype)
    self.conv_logits = layers.conv(self.num_classes, 1, dtype=self.dtype)

  def __call__(self, roi_feats: jnp.ndarray) -> jnp.ndarray:
    """Mask logits.

    Args:
      roi_feats: ``(..., 14, 14, C)`` mask RoIAlign features.

    Returns:
      ``(..., 28, 28, num_classes)`` float32 logits (classes last).
    """
    lead = roi_feats.shape[:-3]
    x = roi_feats.reshape((-1,) + roi_feats.shape[-3:]).astype(self.dtype)
    for conv in self.convs:
      x = conv(x)
    x = nn.relu(self.upsample(x))
    x = self.conv_logits(x).astype(jnp.float32)
    return x.reshape(lead + x.shape[1:])


def mask_targets(pos_rois: jnp.ndarray,
                 pos_assigned_gt: jnp.ndarray,
                 gt_masks: jnp.ndarray,
                 mask_frames: jnp.ndarray,
                 pad_hw,
                 mask_size: int = 28,
                 valid: jnp.ndarray | None = None,
                 max_samples: int | None = None) -> jnp.ndarray:
  """Mask-head targets of one image (spec §3.3, ``mask_target`` +
  ``crop_and_resize``).

  Each RoI is clipped to the padded image ``[0, W_pad] x [0, H_pad]``, mapped
  into its GT crop's cell coordinates and RoIAligned from the crop
  (``aligned=True``, adaptive sampling, avg) to ``mask_size`` squared, then
  binarised at ``>= 0.5``. In the exact mode (frame = padded image, crop =
  full bitmap) this is mmdetection's computation. With box crops the
  sampling grid follows the crop's cells (the adaptive count is taken in crop
  cells) and GT pixels outside the frame count as 0, an approximation
  measured in ``tests/test_training_targets.py``.

  Args:
    pos_rois: ``(P, 4)`` positive RoIs, train scale (e.g. the first 128
      slots of ``roi_heads.rcnn_targets``).
    pos_assigned_gt: ``(P,)`` int32 0-based GT index.
    gt_masks: ``(G, Mh, Mw)`` uint8/bool/float crops (``ops.masks``
      docstring).
    mask_frames: ``(G, 4)`` frame boxes of the crops.
    pad_hw: ``(2,)`` (h, w) of the image's ``pad_shape`` (mmdetection's
      mask size the proposal is clipped to).
    mask_size: output side (28).
    valid: optional ``(P,)`` bool; invalid rows come out 0.
    max_samples: static cap of RoIAlign's adaptive samples per bin side.
      Default ``ceil(2 * max(Mh, Mw) / mask_size)``: enough for positives
      (IoU >= 0.5 bounds a RoI's side by twice the GT box side) in crop mode
      and for any clipped RoI in the exact mode.

  Returns:
    ``(P, mask_size, mask_size)`` float32 in {0, 1}, no gradient.
  """
  gt_masks = jnp.asarray(gt_masks)
  mask_frames = jnp.asarray(mask_frames)
  num_gt, mh, mw = gt_masks.shape
  p = pos_rois.shape[0]
  if max_samples is None:
    max_samples = int(math.ceil(2 * max(mh, mw) / mask_size))
  g = jnp.clip(pos_assigned_gt, 0, num_gt - 1)
  rois = clip_boxes(pos_rois.astype(jnp.float32), jnp.asarray(pad_hw))
  fx, fy, cw, ch = crop_geometry(mask_frames, g, (mh, mw))
  crop_boxes = jnp.stack([(rois[:, 0] - fx) / cw, (rois[:, 1] - fy) / ch,
                          (rois[:, 2] - fx) / cw, (rois[:, 3] - fy) / ch],
                         axis=-1)

  def one(gi, box):
    m = gt_masks[gi].astype(jnp.float32)[:, :, None]
    return roi_align(m, box[None], 1.0, mask_size, max_samples,
                     valid_hw=(mh, mw), sampling_ratio=0,
                     aligned=True)[0, :, :, 0]

  out = jax.vmap(one)(g, crop_boxes)
  out = (out >= 0.5).astype(jnp.float32)
  if valid is not None:
    out = jnp.where(valid[:, None, None], out, 0.0)
  assert out.shape == (p, mask_size, mask_size)
  return jax.lax.stop_gradient(out)


def mask_loss(mask_logits: jnp.ndarray,
              mask_targets: jnp.ndarray,
              valid: jnp.ndarray) -> jnp.ndarray:
  """Mask BCE (spec §3.3, ``FCNMaskHead.loss``): mean over valid positive
  RoIs x pixels.

  Args:
    mask_logits: ``(..., P, 28, 28)`` logits of each RoI's GT class
      (``roi_heads.select_class``).
    mask_targets: ``(..., P, 28, 28)`` in {0, 1} (``mask_targets``).
    valid: ``(..., P)`` bool, the positive RoIs.

  Returns:
    scalar; 0 when there is no positive.
  """
  hw = mask_logits.shape[-2] * mask_logits.shape[-1]
  bce = bce_with_logits(mask_logits.astype(jnp.float32),
                        mask_targets.astype(jnp.float32))
  per_roi = jnp.sum(bce, axis=(-2, -1)) * valid
  num = jnp.sum(valid).astype(jnp.float32) * hw
  return jnp.sum(per_roi) / jnp.maximum(num, 1.0)
