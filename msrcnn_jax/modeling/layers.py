"""Shared building blocks: frozen BN, PyTorch-padded convs, validity masks.

Every conv here pads explicitly and symmetrically by ``kernel_size // 2`` as
PyTorch does; XLA's 'SAME' pads (0, 1) / (2, 3) for stride-2 convs on even
inputs and would shift every feature (spec §5.5).

Features are NHWC. A batch is padded to a bucket shape larger than each
image's own ``pad_shape``; ``mask_invalid`` zeroes what lies beyond an image's
valid feature size ``ops.padding.valid_size(pad_shape, stride)`` so the
convolutions see the zeros that mmdetection's (smaller) tensors have there.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from msrcnn_jax.ops import grouped_conv

# mmcv initialisers (used only when training from scratch; spec §1.6):
# kaiming_init(mode='fan_out', nonlinearity='relu', distribution='normal').
KAIMING_FAN_OUT = nn.initializers.variance_scaling(
    2.0, 'fan_out', 'normal')  # 'normal' is untruncated in jax
# xavier_init(distribution='uniform') of FPN convs and shared FCs.
XAVIER_UNIFORM = nn.initializers.xavier_uniform()
# caffe2_xavier_init = kaiming_uniform(a=1, mode='fan_in'): U(+-sqrt(3/fan_in)).
CAFFE2_XAVIER = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def valid_mask(valid_hw: jnp.ndarray, height: int,
               width: int) -> jnp.ndarray:
  """Boolean ``(B, height, width, 1)``: True at rows < h and cols < w."""
  valid_hw = jnp.asarray(valid_hw, jnp.int32)
  rows = jnp.arange(height, dtype=jnp.int32)[None, :] < valid_hw[:, 0:1]
  cols = jnp.arange(width, dtype=jnp.int32)[None, :] < valid_hw[:, 1:2]
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def mask_invalid(x: jnp.ndarray, valid_hw: jnp.ndarray,
                 fill_value: float = 0.) -> jnp.ndarray:
  """Sets ``x[b, i, j, :]`` to ``fill_value`` where i >= h_b or j >= w_b.

  Args:
    x: ``(B, H, W, C)`` features of a bucket-padded batch.
    valid_hw: ``(B, 2)`` int32 valid ``(h, w)`` of each image at x's stride
      (see ``ops.padding.valid_size``).
    fill_value: 0 before convolutions (PyTorch zero padding). Never +-inf:
      a non-finite fill reaches the backward pass as inf * 0 = NaN.

  Returns:
    ``x`` with the invalid rows / columns replaced, same shape and dtype.
  """
  mask = valid_mask(valid_hw, x.shape[1], x.shape[2])
  return jnp.where(mask, x, jnp.asarray(fill_value, x.dtype))


def conv(features: int, kernel_size: int, stride: int = 1, groups: int = 1,
         use_bias: bool = True, padding: Optional[int] = None,
         kernel_init=KAIMING_FAN_OUT, dtype: Any = jnp.float32,
         name: Optional[str] = None) -> nn.Conv:
  """A ``torch.nn.Conv2d`` equivalent: NHWC, HWIO kernel, explicit padding.

  Args:
    features: output channels.
    kernel_size: square kernel side.
    stride: square stride.
    groups: ``feature_group_count``; the kernel is ``(k, k, in/groups, out)``.
      On a TPU, groups narrower than 32 channels run packed into 128-lane
      blocks (``ops.grouped_conv``; same parameters and results).
    use_bias: whether the conv has a bias (mmdetection: False before BN).
    padding: symmetric padding per side; ``kernel_size // 2`` by default
      (never 'SAME', spec §5.5).
    kernel_init: initialiser used when training from scratch.
    dtype: computation dtype (parameters stay float32).
    name: Flax module name (mmdetection's key with '.N' -> '_N').

  Returns:
    An ``nn.Conv`` with params ``kernel`` and (if ``use_bias``) ``bias``.
  """
  pad = kernel_size // 2 if padding is None else padding
  return nn.Conv(features, (kernel_size, kernel_size),
                 strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=use_bias,
                 kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                 dtype=dtype, param_dtype=jnp.float32,
                 conv_general_dilated=(grouped_conv.conv_general_dilated
                                       if groups > 1 else None),
                 name=name)


class ConvModule(nn.Module):
  """mmcv ``ConvModule`` without norm: conv (submodule ``conv``) [+ ReLU].

  Attributes:
    features: output channels.
    kernel_size: square kernel; padding ``kernel_size // 2``.
    relu: apply ReLU after the conv (mask head: yes; FPN: no).
    kernel_init: initialiser for training from scratch.
    dtype: computation dtype.
  """
  features: int
  kernel_size: int
  relu: bool = True
  kernel_init: Any = KAIMING_FAN_OUT
  dtype: Any = jnp.float32

  def setup(self):
    self.conv = conv(self.features, self.kernel_size,
                     kernel_init=self.kernel_init, dtype=self.dtype)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``(B, H, W, C_in) -> (B, H, W, features)``."""
    y = self.conv(x)
    return nn.relu(y) if self.relu else y


class FrozenBatchNorm(nn.Module):
  """BatchNorm in eval mode (mmdetection ``norm_eval=True``, spec §5.4).

  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` over the last axis.
  ``mean`` and ``var`` live in the 'batch_stats' collection and are never
  updated, in training as well; ``scale`` and ``bias`` are params (trainable
  or not is the optimizer's choice: caffe style freezes them).

  Attributes:
    eps: added to var (mmcv default 1e-5).
    dtype: computation dtype.
    zero_scale: initialise ``scale`` to 0 instead of 1 (for the last BN of
      a residual block when training from scratch; converted weights
      overwrite it).
  """
  eps: float = 1e-5
  dtype: Any = jnp.float32
  zero_scale: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``(..., C) -> (..., C)``."""
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.zeros if self.zero_scale
                       else nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable('batch_stats', 'mean',
                         lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable('batch_stats', 'var',
                        lambda: jnp.ones((c,), jnp.float32)).value
    # Statistics are buffers, not learnable, even if 'batch_stats' is
    # differentiated by mistake.
    mean = jax.lax.stop_gradient(mean)
    var = jax.lax.stop_gradient(var)
    # PyTorch's CPU kernel form: x * alpha + (bias - mean * alpha).
    alpha = scale / jnp.sqrt(var + self.eps)
    beta = bias - mean * alpha
    # At least float32 (bfloat16 inputs are normalised in float32).
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32)) * alpha + beta
    return y.astype(jnp.promote_types(self.dtype, x.dtype))


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """``nn.MaxPool2d(3, stride=2, padding=1)``: -inf padding (spec §1.2)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
