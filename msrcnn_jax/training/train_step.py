"""The train state and the one jitted training step.

The step runs entirely on device (no host round trip): value-and-grad of the
task's loss over the trainable 'params', one optax update, metrics. Its
``finite`` metric lets the host stop on a NaN/Inf loss (see
:func:`check_finite`); a non-finite step returns the *input* state unchanged,
so the state held in memory is always the last good one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from msrcnn_jax import errors
from msrcnn_jax.training import optimizer as optimizer_lib
from msrcnn_jax.training import partitioning

PyTree = Any
# loss_fn(params, batch_stats, batch, rng, compute_dtype) -> (loss, metrics)
LossFn = Callable[..., tuple[jnp.ndarray, Mapping[str, jnp.ndarray]]]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  Attributes:
    step: int32 scalar, optimizer updates applied so far.
    params: float32 'params' collection (always float32, also with bf16
      compute).
    batch_stats: 'batch_stats' collection (frozen BN statistics; never
      updated).
    opt_state: the optax state.
    rng: uint32 raw key data (``jax.random.key_data``) of the training RNG.
  """
  step: jnp.ndarray
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jnp.ndarray

  def to_dict(self) -> dict[str, Any]:
    return dict(step=self.step, params=self.params,
                batch_stats=self.batch_stats, opt_state=self.opt_state,
                rng=self.rng)


def create_train_state(variables: Mapping[str, PyTree],
                       tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """A step-0 state from init variables.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` ('batch_stats' may be
      missing or empty).
    tx: the optimizer (its state is initialised from ``params``).
    rng: a typed key or raw uint32 key data; stored as raw key data.
  """
  params = variables['params']
  if jnp.issubdtype(getattr(rng, 'dtype', None), jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), rng=jnp.asarray(rng))


def _dtype(name) -> jnp.dtype:
  return jnp.dtype({'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
                    'float16': jnp.float16}.get(str(name), name))


def make_train_step(loss_fn: LossFn,
                    tx: optax.GradientTransformation,
                    mesh: Mesh,
                    *,
                    compute_dtype='float32',
                    schedule_fn: Callable[[Any], Any] | None = None,
                    mask: PyTree | None = None,
                    donate: bool = True):
  """Builds ``train_step(state, batch) -> (state, metrics)``, jitted.

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch, rng, compute_dtype) ->
      (total_loss float32 scalar, dict of float32 scalars)``; the batch is the
      global batch (mean losses over it).
    tx: the optimizer (see :func:`optimizer.make_optimizer`).
    mesh: the ``('data',)`` mesh; the state is replicated, every batch leaf
      is sharded along axis 0.
    compute_dtype: 'float32' or 'bfloat16'; passed to ``loss_fn`` as a
      ``jnp.dtype`` (parameters and optimizer state stay float32).
    schedule_fn: learning-rate schedule, reported as metric 'lr'.
    mask: trainable mask (True = trainable); 'grad_norm' is taken over the
      trainable gradients only, and frozen parameters leave the step as
      they came in (the same bits).
    donate: donate the input state's buffers.

  Returns:
    The jitted step. ``metrics`` holds 'loss', every entry of the loss dict,
    'lr' (the lr of this update), 'grad_norm' and 'finite' (bool: loss,
    metrics and gradient norm all finite; if False the state is returned
    unchanged).
  """
  cdtype = _dtype(compute_dtype)
  replicated = partitioning.replicated_sharding(mesh)
  data = partitioning.batch_sharding(mesh)

  def step_fn(state: TrainState, batch):
    key = jax.random.wrap_key_data(state.rng)
    next_key, step_key = jax.random.split(key)

    def objective(params):
      loss, aux = loss_fn(params, state.batch_stats, batch, step_key, cdtype)
      return loss.astype(jnp.float32), aux

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if mask is not None:
      # Frozen parameters are passed through untouched (bit for bit, also
      # -0.0, which ``p + 0`` would turn into +0.0).
      params = jax.tree.map(lambda m, old, new: new if m else old, mask,
                            state.params, params)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
    metrics['loss'] = loss
    metrics['grad_norm'] = optimizer_lib.masked_global_norm(grads, mask)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v))
                                for v in metrics.values()]))
    if schedule_fn is not None:
      metrics['lr'] = jnp.asarray(schedule_fn(state.step), jnp.float32)
    metrics['finite'] = finite
    new_state = TrainState(step=state.step + 1, params=params,
                           batch_stats=state.batch_stats, opt_state=opt_state,
                           rng=jax.random.key_data(next_key))
    # Keep the last good state on a NaN/Inf step (the host then raises).
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                             state)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(replicated, data),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,) if donate else ())


class NonFiniteStepError(errors.UserError, FloatingPointError):
  """A training step gave a non-finite loss or gradient.

  A ``UserError`` so that ``train.py`` ends with one ``error:`` line (the
  usual causes are the run's settings: a learning rate too high for the
  batch, no warm-up, no gradient clipping), and a ``FloatingPointError``
  for code that catches numeric failures.
  """


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Raises if a fetched step's metrics say the step was not finite.

  Args:
    metrics: host values of one step's metrics (see :func:`make_train_step`).
    step: the index of that update (the state's step before it).

  Raises:
    NonFiniteStepError: naming the step, every non-finite metric and the
      settings that usually cause it.
  """
  if bool(metrics.get('finite', True)):
    return
  bad = sorted(k for k, v in metrics.items()
               if k != 'finite' and not np.all(np.isfinite(v)))
  values = ', '.join(f'{k}={float(np.asarray(metrics[k]))}' for k in bad)
  raise NonFiniteStepError(
      f'Non-finite training step {step}: {values or "gradients"} '
      f'(state kept at step {step}; no checkpoint written after it). '
      'Lower train.learning_rate, lengthen train.warmup_steps or set '
      'train.grad_clip_norm, then resume from the last checkpoint.')
