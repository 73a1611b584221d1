"""A tiny stand-in detector task for the training tests (not a test file).

Layers are per-pixel Dense (1x1 "convs", cheap to compile) named as the real
model's, following the parameter-tree conventions (``backbone/conv1``,
``backbone/bn1``, ``backbone/layer1_0/...``, a BN ``downsample_1``, a neck and
a head), so the freezing rules, the optimizer and the trainer can be checked
without the detector. The loss uses the step RNG (input noise), so a wrong RNG
after a resume changes the result.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMG = 8         # image side
CH = 3          # input channels


class _BN(nn.Module):
  """Frozen-statistics BN: params scale/bias, batch_stats mean/var."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,)))
    var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,)))
    inv = scale * jax.lax.rsqrt(var.value + 1e-5)
    return x * inv.astype(x.dtype) + (bias - mean.value * inv).astype(x.dtype)


class _Block(nn.Module):
  features: int
  downsample: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.features, use_bias=False, name='conv1',
                 dtype=x.dtype)(x)
    y = _BN(name='bn1')(y)
    if self.downsample:
      x = nn.Dense(self.features, use_bias=False, name='downsample_0',
                   dtype=x.dtype)(x)
      x = _BN(name='downsample_1')(x)
    return nn.relu(x + y)


class _Backbone(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, use_bias=False, name='conv1', dtype=x.dtype)(x)
    x = nn.relu(_BN(name='bn1')(x))
    x = _Block(4, name='layer1_0')(x)
    x = _Block(6, downsample=True, name='layer2_0')(x)
    return x


class StandInModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = _Backbone(name='backbone')(x)
    x = nn.Dense(4, name='neck', dtype=x.dtype)(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(2, name='head', dtype=x.dtype)(x)


class StandInTask:
  """The TrainTask interface the trainer expects, on :class:`StandInModel`.

  Batches are dicts ``image (B, 8, 8, 3) float32``, ``target (B, 2)
  float32`` and ``poison (B,) float32`` (a non-zero entry makes the loss NaN).
  """

  def __init__(self, frozen_stages=1, bn_trainable=False):
    self.model = StandInModel()
    self.frozen_stages = frozen_stages
    self.bn_trainable = bn_trainable

  def init_variables(self, rng, batch):
    variables = self.model.init(rng, jnp.asarray(batch['image']))
    # Non-trivial frozen statistics so that 'batch_stats' matter.
    stats = jax.tree.map(lambda v: v * 0.5 + 0.1, variables['batch_stats'])
    return {'params': variables['params'], 'batch_stats': stats}

  def loss_fn(self, params, batch_stats, batch, rng, compute_dtype):
    img = jnp.asarray(batch['image'])
    img = img + 0.01 * jax.random.normal(rng, img.shape)
    cast = lambda t: jax.tree.map(lambda a: a.astype(compute_dtype), t)
    pred = self.model.apply({'params': cast(params),
                             'batch_stats': batch_stats},
                            img.astype(compute_dtype))
    pred = pred.astype(jnp.float32)
    err = pred - batch['target']
    reg = jnp.mean(jnp.square(err[:, 0]))
    aux = jnp.mean(jnp.abs(err[:, 1]))
    poison = jnp.max(batch['poison'])
    aux = jnp.where(poison > 0, jnp.nan, aux)
    total = reg + aux
    return total, {'loss_reg': reg, 'loss_aux': aux}

  def frozen_mask(self, params):
    from msrcnn_jax.training import optimizer
    return optimizer.trainable_mask(params, self.frozen_stages,
                                    self.bn_trainable)


def make_batch(step, batch_size, poison_steps=()):
  """The deterministic host batch number ``step`` (numpy)."""
  rs = np.random.default_rng(1000 + step)
  return {
      'image': rs.normal(size=(batch_size, IMG, IMG, CH)).astype(np.float32),
      'target': rs.normal(size=(batch_size, 2)).astype(np.float32),
      'poison': np.full((batch_size,), float(step in poison_steps),
                        np.float32),
  }


def make_iter_fn(batch_size, poison_steps=()):
  """``train_iter_fn(config, start_step)`` yielding :func:`make_batch`."""

  def train_iter_fn(config, start_step):
    del config

    def gen():
      step = start_step
      while True:
        yield make_batch(step, batch_size, poison_steps)
        step += 1

    return gen()

  return train_iter_fn


def small_config(**train_overrides):
  """The r50 caffe config with a tiny schedule for the stand-in."""
  from msrcnn_jax.config import ms_rcnn_config
  c = ms_rcnn_config()
  c.name = 'standin'
  t = c.train
  t.global_batch_size = 8
  t.base_batch_size = 16
  t.warmup_steps = 4
  t.images_per_epoch = 32         # 4 steps per epoch
  t.epochs = 3
  t.lr_steps_epochs = [2]
  t.log_every_steps = 2
  t.checkpoint_every_steps = 100
  t.keep_checkpoints = 3
  for k, v in train_overrides.items():
    t[k] = v
  return c
