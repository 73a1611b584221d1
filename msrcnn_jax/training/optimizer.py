"""SGD as mmdetection 2.x trains MS R-CNN: schedule, weight decay, freezing.

Reproduces (spec §1.8):
- ``torch.optim.SGD(lr, momentum=0.9, weight_decay=1e-4)``: the weight decay is
  added to the gradient *before* the momentum buffer (coupled L2, not AdamW
  style), the buffer is ``buf = momentum * buf + grad`` (dampening 0, no
  Nesterov) and the update is ``param -= lr * buf``. The learning rate scales
  the buffer at the step it is applied, so a changing lr does not rescale the
  history (optax ``trace`` followed by ``scale_by_learning_rate``).
- mmcv ``StepLrUpdaterHook(by_epoch=True)`` with a linear warm-up:
  ``lr = regular * (1 - k)``, ``k = (1 - it / warmup) * (1 - warmup_ratio)``
  for ``it < warmup``; the regular lr is multiplied by ``lr_decay`` once per
  milestone epoch already reached (``epoch >= milestone``, epochs 0-based).
- mmcv's ``OptimizerHook(grad_clip=...)``: ``clip_grad_norm_`` over the
  trainable parameters' gradients, before the weight decay is added.
- Frozen parameters (``requires_grad=False`` in mmdetection: the stem and
  ``layer1`` with ``frozen_stages=1``; every BN gamma/beta of a caffe-style
  backbone, spec §1.2) receive no update and no weight decay, and are left out
  of the clipping norm.

The step counter is the number of optimizer updates already applied (mmcv's
``runner.iter`` before the iteration): update number ``step`` uses
``schedule_fn(step)``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from msrcnn_jax import variables as variables_lib
from msrcnn_jax.errors import ConfigError
from msrcnn_jax.modeling.backbone import ResNet

PyTree = Any



def scaled_base_lr(config: ml_collections.ConfigDict) -> float:
  """Linear scaling rule: ``base_lr * global_batch_size / base_batch_size``."""
  t = config.train
  return float(t.base_lr) * float(t.global_batch_size) / float(
      t.base_batch_size)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Optimizer steps per epoch, ``ceil(images_per_epoch / global_batch)``.

  mmdetection's (distributed) GroupSampler pads each epoch up to whole
  batches, so a partial last batch still counts as an iteration.
  """
  t = config.train
  return int(math.ceil(int(t.images_per_epoch) / int(t.global_batch_size)))


def total_steps(config: ml_collections.ConfigDict) -> int:
  """``train.max_steps`` if positive, else ``epochs * steps_per_epoch``."""
  t = config.train
  if int(t.max_steps) > 0:
    return int(t.max_steps)
  return int(t.epochs) * steps_per_epoch(config)


def decay_boundaries(config: ml_collections.ConfigDict) -> list[int]:
  """First step of each milestone epoch in ``train.lr_steps_epochs``."""
  spe = steps_per_epoch(config)
  return [int(e) * spe for e in config.train.lr_steps_epochs]


def make_schedule(config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """The learning rate of update number ``step`` (jit-safe, int or array).

  Args:
    config: the full config; reads ``config.train`` base_lr,
      global_batch_size, base_batch_size, warmup_steps, warmup_ratio,
      lr_steps_epochs, lr_decay, images_per_epoch.

  Returns:
    ``schedule_fn(step) -> float32 scalar`` learning rate.
  """
  t = config.train
  base = scaled_base_lr(config)
  boundaries = decay_boundaries(config)
  decay = float(t.lr_decay)
  warmup = int(t.warmup_steps)
  ratio = float(t.warmup_ratio)

  def schedule_fn(step):
    step = jnp.asarray(step, jnp.int32)
    num_decays = jnp.zeros((), jnp.int32)
    for b in boundaries:
      num_decays = num_decays + (step >= b).astype(jnp.int32)
    regular = base * jnp.power(jnp.float32(decay), num_decays)
    if warmup <= 0:
      return regular.astype(jnp.float32)
    # mmcv LrUpdaterHook.get_warmup_lr('linear'): regular * (1 - k) with
    # k = (1 - it / warmup) * (1 - ratio), written as ratio + (1 - ratio) *
    # it / warmup (the same value) to avoid float32 cancellation at it = 0.
    frac = step.astype(jnp.float32) / warmup
    warm = regular * (ratio + (1.0 - ratio) * frac)
    return jnp.where(step < warmup, warm, regular).astype(jnp.float32)

  return schedule_fn


def _is_norm_module(tree: PyTree, names: tuple[str, ...]) -> bool:
  """A module is a BN layer if its parameter dict holds a ``scale`` leaf."""
  node = tree
  for n in names[:-1]:
    node = node[n]
  return isinstance(node, Mapping) and 'scale' in node


def trainable_mask(params: PyTree,
                   frozen_stages: int = 1,
                   bn_trainable: bool = False,
                   stage_of: Callable[[str], int | None] = ResNet.stage_of
                   ) -> PyTree:
  """Which parameters mmdetection trains (``requires_grad``), by path.

  The backbone says which stage each of its top-level parameter scopes
  belongs to (``stage_of``; ResNet: 0 for ``conv1``/``bn1``, i for
  ``layer{i}_*``). With ``frozen_stages=k`` (mmdet ``ResNet._freeze_stages``)
  every scope of stage ``<= k`` is frozen. With
  ``bn_trainable=False`` (caffe style, ``norm_cfg.requires_grad=False``) every
  BN ``scale``/``bias`` of the backbone is frozen too. Non-backbone
  parameters are always trainable. The 'batch_stats' collection is never
  part of the optimizer.

  Args:
    params: the 'params' collection (nested dicts of arrays).
    frozen_stages: mmdetection's ``frozen_stages`` (-1 = nothing frozen).
    bn_trainable: whether backbone BN gamma/beta are trained (pytorch style).
    stage_of: the backbone's ``stage_of(scope name) -> int | None``.

  Returns:
    A pytree of Python bools with the structure of ``params``; True means
    trainable.
  """

  def label(path, _):
    names = variables_lib.path_names(path)
    if not names or names[0] != 'backbone' or len(names) < 2:
      return True
    stage = stage_of(names[1])
    if stage is not None and stage <= frozen_stages:
      return False
    if not bn_trainable and _is_norm_module(params, names):
      return False
    return True

  return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask_from_config(
    params: PyTree, config: ml_collections.ConfigDict,
    stage_of: Callable[[str], int | None] = ResNet.stage_of) -> PyTree:
  """:func:`trainable_mask` with ``config.model.backbone`` settings, and
  with ``config.train.trainable_patterns`` (regexes, ``re.search`` on
  ``'params/roi_head/mask_iou_head/fc_mask_iou/kernel'``) when set: then only
  the parameters that match one of them AND that mmdetection trains are
  trainable (everything else frozen: no update, no optimizer state), e.g.
  ``('^params/roi_head/mask_iou_head/',)`` trains a MaskIoU head alone.

  Raises:
    ConfigError: a pattern matches no parameter.
  """
  bb = config.model.backbone
  mask = trainable_mask(params, frozen_stages=int(bb.frozen_stages),
                        bn_trainable=bool(bb.bn_trainable), stage_of=stage_of)
  patterns = tuple(config.train.get('trainable_patterns', ()))
  if not patterns:
    return mask
  compiled = [re.compile(p) for p in patterns]
  paths = jax.tree_util.tree_map_with_path(
      lambda path, _: 'params/' + '/'.join(variables_lib.path_names(path)),
      params)
  names = jax.tree.leaves(paths)
  for p in compiled:
    if not any(p.search(n) for n in names):
      raise ConfigError(
          f'train.trainable_patterns: {p.pattern!r} matches no parameter '
          f'(parameter paths look like {names[-1]!r})')
  return jax.tree.map(lambda m, n: m and any(p.search(n) for p in compiled),
                      mask, paths)


def make_optimizer(
    config: ml_collections.ConfigDict,
    mask: PyTree | None = None,
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """mmdetection's SGD as an optax transformation.

  The chain for trainable parameters is
  ``[clip_by_global_norm] -> add_decayed_weights(wd) -> trace(momentum) ->
  scale_by_learning_rate(schedule)``; frozen ones get ``set_to_zero``.
  ``config.train.optimizer = 'adamw'`` swaps the SGD part for
  ``optax.adamw(schedule, weight_decay)`` (decoupled decay), which trains the
  from-scratch quickstart much faster; mmdetection's configs use SGD.

  Args:
    config: reads ``config.train`` momentum, weight_decay, grad_clip_norm and
      the schedule keys (see :func:`make_schedule`).
    mask: pytree of bools (True = trainable) with the params structure, e.g.
      from :func:`trainable_mask_from_config`; None trains everything.

  Returns:
    ``(optimizer, schedule_fn)``.
  """
  t = config.train
  schedule_fn = make_schedule(config)
  parts = []
  if float(t.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(t.grad_clip_norm)))
  kind = t.get('optimizer', 'sgd')
  if kind == 'adamw':
    parts.append(optax.adamw(schedule_fn, weight_decay=float(t.weight_decay)))
  elif kind == 'sgd':
    if float(t.weight_decay) > 0:
      parts.append(optax.add_decayed_weights(float(t.weight_decay)))
    parts.append(optax.trace(decay=float(t.momentum), nesterov=False))
    parts.append(optax.scale_by_learning_rate(schedule_fn))
  else:
    raise ConfigError(f'config.train.optimizer must be sgd or adamw, got '
                      f'{kind!r}')
  sgd = optax.chain(*parts)
  if mask is None:
    return sgd, schedule_fn
  labels = jax.tree.map(lambda m: 'train' if m else 'frozen', mask)
  tx = optax.multi_transform({'train': sgd, 'frozen': optax.set_to_zero()},
                             labels)
  return tx, schedule_fn


def masked_global_norm(tree: PyTree, mask: PyTree | None) -> jnp.ndarray:
  """Global L2 norm over the leaves where ``mask`` is True (all if None)."""
  if mask is None:
    return optax.global_norm(tree)
  leaves = [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
            if m]
  return optax.global_norm(leaves)
