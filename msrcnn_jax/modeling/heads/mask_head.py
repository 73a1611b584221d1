"""FCNMaskHead: 4 convs, 2x deconv, per-class 1x1 logits (spec §1.6, §5.7).

Params: ``convs_i/conv`` (3x3, pad 1, bias, ReLU), ``upsample`` (kernel
``(2, 2, in, out)``, bias), ``conv_logits`` (1x1, 80 outputs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from msrcnn_jax.modeling import layers


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
