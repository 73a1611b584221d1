"""Train-state checkpoints with orbax ``CheckpointManager``.

Layout: ``<workdir>/checkpoints/<step>/{state,metadata}``. 'state' holds the
:class:`TrainState` as a dict (step, params, batch_stats, opt_state, rng as
raw uint32 key data); 'metadata' is JSON (data position, config name, batch
size, wall time). Saves are asynchronous (the arrays are copied off device,
then written by a background thread while training goes on), atomic (orbax
writes into a temporary directory and renames it when complete, so a crashed
save never shows up as a checkpoint) and keep the newest ``keep``. Every
process must call :meth:`Checkpointer.save` (orbax coordinates hosts).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from msrcnn_jax.training.train_step import TrainState

PyTree = Any


@jax.jit
def _all_finite(tree: PyTree) -> jnp.ndarray:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _abstract(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) to restore into."""

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=getattr(x, 'sharding', None))

  return jax.tree.map(one, tree)


class Checkpointer:
  """Periodic, asynchronous, keep-last-N train-state checkpoints.

  Args:
    directory: where step directories go (created if missing).
    keep: how many of the newest checkpoints to keep
      (``train.keep_checkpoints``).
    async_save: write in a background thread
      (``enable_async_checkpointing``).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    # Local paths are made absolute; remote ones (gs://...) pass as they are.
    self.directory = (directory if '://' in str(directory) else
                      os.path.abspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        create=True,
        enable_async_checkpointing=async_save,
        # Half-written temporary directories of a crashed run are removed.
        cleanup_tmp_directories=True)
    self._sigterm = False
    self._previous_handler = None
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'metadata'))

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, metadata: Mapping[str, Any] | None = None,
           *, wait: bool = False) -> int:
    """Starts writing ``state`` as checkpoint number ``state.step``.

    Args:
      state: the train state (replicated global arrays).
      metadata: JSON-serialisable dict (data position, config name, ...).
      wait: block until the write is complete.

    Returns:
      The step saved.

    Raises:
      FloatingPointError: before anything is written, if any float leaf of
        the state holds NaN or Inf.
      TypeError: before anything is written, if ``metadata`` is not JSON
        serialisable.
    """
    step = int(jax.device_get(state.step))
    if not bool(jax.device_get(_all_finite(state.to_dict()))):
      raise FloatingPointError(
          f'Refusing to checkpoint step {step}: the train state contains '
          'NaN or Inf.')
    meta = dict(metadata or {})
    meta.setdefault('step', step)
    meta.setdefault('saved_at', time.time())
    json.dumps(meta)   # a TypeError here, before anything is written
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.to_dict()),
        metadata=ocp.args.JsonSave(meta)), force=True)
    if wait:
      self.wait_until_finished()
    return step

  def restore(self, step: int, template: TrainState) -> TrainState:
    """Restores checkpoint ``step`` into the structure/shardings of
    ``template`` (concrete arrays or ShapeDtypeStructs)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(template.to_dict()))))
    return TrainState(**restored['state'])

  def restore_latest(self,
                     template: TrainState) -> tuple[TrainState, int] | None:
    """``(state, step)`` of the newest complete checkpoint, or None."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, template), step

  def metadata(self, step: int) -> dict[str, Any]:
    """The JSON metadata item of checkpoint ``step``."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))
    return dict(restored['metadata'])

  def reached_preemption(self, step: int) -> bool:
    """True once the cluster announced a preemption (all hosts agree on the
    step; orbax/JAX preemption sync point) or this process got SIGTERM
    (see :meth:`catch_sigterm`)."""
    return self._sigterm or bool(self._manager.reached_preemption(step))

  def catch_sigterm(self) -> None:
    """Turns SIGTERM into :meth:`reached_preemption` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
      return
    def handler(signum, frame):
      del signum, frame
      logging.warning('SIGTERM: checkpointing at the end of this step')
      self._sigterm = True
    self._previous_handler = signal.signal(signal.SIGTERM, handler)

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous writes are on disk (and re-raises
    their errors)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes, then releases the manager."""
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
    try:
      self._manager.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def log_restored(step: int, metadata: Mapping[str, Any]) -> None:
  logging.info('Resuming from step %d (data position %s, config %s)', step,
               metadata.get('data_position'), metadata.get('config_name'))
