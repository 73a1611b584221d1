"""Train-state checkpoints with orbax ``CheckpointManager``.

Layout: ``<workdir>/checkpoints/<step>/{state,metadata}``. 'state' holds the
:class:`TrainState` as a dict (step, params, batch_stats, opt_state, rng as
raw uint32 key data); 'metadata' is JSON (data position, config name, batch
size, wall time, the whole config). Saves are asynchronous (the arrays are
copied off device, then written by a background thread while training goes
on), atomic (on a local filesystem orbax writes
``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` when
complete; on GCS a ``commit_success.txt`` marks a complete step; so a
crashed save never shows up as a checkpoint, see
``tests/test_training_checkpoint.py``) and keep the newest ``keep``. Every
process must call :meth:`Checkpointer.save` (orbax coordinates hosts).

A restart (:meth:`Checkpointer.restore_newest`) takes the newest intact
step. A step whose files were damaged after it was written (a data file
missing or truncated, ``state/_METADATA`` missing, a metadata file that is
not JSON) is skipped with a warning naming the step and what is wrong, and
moved aside to ``<step>.damaged`` once an older step restored (so that the
resumed run can write that step again); nothing is ever deleted. With no
intact step the restart stops with one ``CheckpointError``. A checkpoint
that is intact but does not fit the config (e.g. another model width) is
not damage: :class:`RestoreMismatchError` names the differing config keys
(each step's metadata holds its config) and the first differing variables,
with the full list in a file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from msrcnn_jax import variables as variables_lib
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
    self._damaged: dict[int, str] = {}   # step -> what is wrong
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

  def damage(self, step: int) -> str | None:
    """What is wrong with the files of checkpoint ``step`` that can be seen
    without reading the arrays (None if nothing): the metadata item missing
    or not JSON, ``state/_METADATA`` missing, a data file that the state's
    OCDBT b-tree refers to missing or shorter than the bytes it refers to,
    the arrays' metadata unreadable."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    step_dir = os.path.join(self.directory, str(step))   # also gs://...
    meta = os.path.join(step_dir, variables_lib.TRAIN_METADATA_ITEM,
                        variables_lib.TRAIN_METADATA_ITEM)
    if not epath.Path(meta).exists():
      return f'{_rel(meta, self.directory)} is missing'
    try:
      json.loads(epath.Path(meta).read_text())
    except (OSError, ValueError) as e:
      return f'{_rel(meta, self.directory)} is not JSON ({e})'
    item = os.path.join(step_dir, variables_lib.TRAIN_STATE_ITEM)
    tree = os.path.join(item, '_METADATA')
    if not epath.Path(tree).exists():
      return f'{_rel(tree, self.directory)} is missing'
    # Before orbax reads anything: a missing data file makes its reads
    # fail on background threads, which print tracebacks.
    problem = _ocdbt_damage(item, self.directory)
    if problem:
      return problem
    try:
      self._saved_shapes(step)
    except Exception as e:  # pylint: disable=broad-except
      return f'{_rel(item, self.directory)} cannot be read ({_short(e)})'
    return None

  def newest_readable(self) -> tuple[int, dict[str, Any]] | None:
    """``(step, metadata)`` of the newest checkpoint that :meth:`damage`
    finds nothing wrong with (newer damaged steps are warned about), or
    None if there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints but every one is damaged.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      reason = self.damage(step)
      if reason is None:
        try:
          return step, self.metadata(step)
        except Exception as e:  # pylint: disable=broad-except
          reason = f'its metadata cannot be read: {_short(e)}'
      self._warn_damaged(step, reason)
    if steps:
      self._raise_none_intact()
    return None

  def restore_newest(self, template: TrainState, newest: int | None = None,
                     config: Any = None
                     ) -> tuple[TrainState, int, dict[str, Any]] | None:
    """Restores the newest intact checkpoint (at most ``newest``).

    Steps are tried newest first; a damaged one (see the module docstring)
    is skipped with a warning. Once one restores, the damaged newer steps
    are renamed ``<step>.damaged`` (process 0; nothing is deleted).

    Args:
      template: the TrainState structure/shardings to restore into.
      newest: the newest step to consider (default: all).
      config: the run's config, to name the keys that differ from the
        checkpoint's config when the variables do not fit.

    Returns:
      ``(state, step, metadata)``, or None if there is no checkpoint.

    Raises:
      RestoreMismatchError: an intact checkpoint whose variables do not fit
        ``template`` (the config changed); names the config keys and the
        first variables that differ and a file with the full list.
      CheckpointError: there are checkpoints but none is intact; names
        each step and what is wrong with it.
    """
    steps = [s for s in self.all_steps() if newest is None or s <= newest]
    if not steps and not self._damaged:
      return None
    for step in reversed(steps):
      reason = self._damaged.get(step) or self.damage(step)
      if reason is None:
        try:
          saved = self._saved_shapes(step)
        except Exception as e:  # pylint: disable=broad-except
          reason = f'cannot be read: {_short(e)}'
      if reason is None:
        self._check_fits(step, saved, template, config)
        try:
          state = self.restore(step, template)
        except Exception as e:  # pylint: disable=broad-except
          reason = f'cannot be read: {_short(e)}'
        else:
          self._move_damaged_aside(step)
          return state, step, self.metadata(step)
      self._warn_damaged(step, reason)
    self._raise_none_intact()

  # ------------------------------------------------- restore: helpers
  def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(self.directory) / str(step) / (
        variables_lib.TRAIN_STATE_ITEM)
    tree = ocp.StandardCheckpointHandler().metadata(path)
    return variables_lib.shapes(getattr(tree, 'tree', tree))

  def _warn_damaged(self, step: int, reason: str) -> None:
    if self._damaged.get(step) == reason:
      return
    self._damaged[step] = reason
    logging.warning('Checkpoint step %d in %s is damaged (%s); falling back '
                    'to an older step (nothing is deleted)', step,
                    self.directory, reason)

  def _raise_none_intact(self):
    listed = '; '.join(f'step {s}: {r}' for s, r in
                       sorted(self._damaged.items(), reverse=True))
    raise variables_lib.CheckpointError(
        f'no intact checkpoint in {self.directory} to resume from ({listed})'
        '; repair or move the damaged steps away, or pass another --workdir '
        'to start afresh')

  def _move_damaged_aside(self, restored: int) -> None:
    newer = sorted(s for s in self._damaged if s > restored)
    if not newer:
      return
    if jax.process_index() == 0 and '://' not in self.directory:
      for step in newer:
        src = os.path.join(self.directory, str(step))
        dst, n = f'{src}.damaged', 1
        while os.path.exists(dst):
          n += 1
          dst = f'{src}.damaged{n}'
        os.rename(src, dst)
        logging.warning('Resuming from step %d; the damaged step %d is kept '
                        'as %s', restored, step, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('msrcnn_damaged_moved')
    self._manager.reload()

  def _check_fits(self, step: int, saved: Mapping[str, tuple[int, ...]],
                  template: TrainState, config: Any) -> None:
    """Raises RestoreMismatchError if checkpoint ``step``'s array shapes
    (``saved``) are not those of ``template``."""
    expected = variables_lib.shapes(template.to_dict())
    missing, unexpected, mis_shaped = variables_lib.compare(expected, saved)
    if not (missing or unexpected or mis_shaped):
      return
    rows = ([(k, f'{k}: absent in the checkpoint, {expected[k]} now')
             for k in missing] +
            [(k, f'{k}: {saved[k]} in the checkpoint, absent now')
             for k in unexpected] +
            [(k, f'{k}: {saved[k]} in the checkpoint, {expected[k]} now')
             for k in mis_shaped])
    # The model's variables first, the optimizer's moments of them last.
    rows.sort(key=lambda row: (row[0].startswith('opt_state/'),
                               not row[0].startswith('params/'), row[0]))
    lines = [text for _, text in rows]
    keys = _config_differences(self.metadata(step).get('config'), config)
    report = os.path.join(os.path.dirname(self.directory),
                          f'restore_mismatch_step{step}.txt')
    where = ''
    if jax.process_index() == 0 and '://' not in report:
      with open(report, 'w') as f:
        f.write(f'Checkpoint step {step} in {self.directory} vs the config '
                f'(host {socket.gethostname()}):\n')
        f.writelines(f'{k}\n' for k in keys)
        f.writelines(f'{line}\n' for line in lines)
      where = f'; all {len(lines)} in {report}'
    # The model's keys decide the arrays; the others are named in the file.
    shown = [k for k in keys if k.startswith('model.')][:5] or keys[:5]
    more = len(keys) - len(shown)
    if keys:
      changed = ('config keys changed since the checkpoint: ' +
                 '; '.join(shown) + (f' (and {more} more)' if more else ''))
    elif config is None or self.metadata(step).get('config') is None:
      changed = "the checkpoint's metadata holds no config to compare"
    else:
      changed = ('no config key differs from the checkpoint\'s (was the '
                 'model code changed?)')
    raise RestoreMismatchError(
        f'checkpoint step {step} in {self.directory} does not fit the '
        f'config: {changed}; {len(lines)} arrays differ, e.g. '
        f'{"; ".join(lines[:2])}{where}. Restore those config values, or '
        'pass another --workdir to start afresh')

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


class RestoreMismatchError(variables_lib.VariablesMismatchError):
  """An intact checkpoint that does not fit the run's config."""


def _ocdbt_damage(item: str, directory: str) -> str | None:
  """A missing or truncated file of the OCDBT database that orbax wrote in
  ``item`` (None if every file the newest version's b-tree refers to is
  there and long enough, or if ``item`` is not a local OCDBT database).

  Walks the b-tree (``tensorstore.ocdbt.dump``: the manifest and the tree
  nodes, a few KB) and checks each referenced file's size against the byte
  range it is referred to for; no array data is read.
  """
  if '://' in item or not os.path.isfile(os.path.join(item, 'manifest.ocdbt')):
    return None
  try:
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    dump = ts.ocdbt.dump
    base = ts.KvStore.open({'driver': 'file',
                            'path': item.rstrip('/') + '/'}).result()
  except (ImportError, AttributeError):    # pragma: no cover
    return None
  try:
    versions = dump(base).result().get('versions') or []
  except Exception as e:  # pylint: disable=broad-except
    return (f'{_rel(os.path.join(item, "manifest.ocdbt"), directory)} '
            f'cannot be read ({_short(e)})')
  if not versions:
    return f'{_rel(item, directory)} holds no committed version'
  sizes: dict[str, int | None] = {}
  todo = [versions[-1]['root']['location']]
  while todo:
    location = todo.pop()
    # 'btreenode::d/<file>:<offset>:<length>' or
    # 'value:ocdbt.process_0/:d/<file>:<offset>:<length>'.
    head, offset, length = location.rsplit(':', 2)
    _, prefix, name = head.split(':', 2)
    path = os.path.join(item, prefix, name)
    if path not in sizes:
      sizes[path] = (os.path.getsize(path) if os.path.isfile(path) else None)
    end = int(offset) + int(length)
    if sizes[path] is None:
      return f'data file {_rel(path, directory)} is missing'
    if sizes[path] < end:
      return (f'data file {_rel(path, directory)} is truncated '
              f'({sizes[path]} bytes, {end} needed)')
    if location.startswith('btreenode:'):
      try:
        node = dump(base, location).result()
      except Exception as e:  # pylint: disable=broad-except
        return (f'data file {_rel(path, directory)} cannot be read '
                f'({_short(e)})')
      for entry in node.get('entries', ()):
        todo.extend(v for v in entry.values() if isinstance(v, str) and
                    v.startswith(('btreenode:', 'value:')))
  return None


def _rel(path: str, start: str) -> str:
  return os.path.join(os.path.basename(start), os.path.relpath(path, start))


def _short(e: BaseException, limit: int = 300) -> str:
  """An (orbax / tensorstore) exception as one short line."""
  text = ' '.join(str(e).split())
  text = text.split(' [tensorstore_spec')[0]
  text = f'{type(e).__name__}: {text}'
  return text if len(text) <= limit else text[:limit - 3] + '...'


def config_record(config: Any) -> dict[str, Any]:
  """A config as the JSON dict a checkpoint's metadata keeps (so that a
  restart can name the keys that changed)."""
  return json.loads(config.to_json_best_effort())


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _config_differences(saved: Any, config: Any) -> list[str]:
  """``['model.neck.out_channels: 32 in the checkpoint, 64 now', ...]``."""
  if not isinstance(saved, Mapping) or config is None:
    return []
  before, now = _flat(saved), _flat(config_record(config))
  out = []
  # The model's keys first: they decide the arrays.
  for key in sorted(set(before) | set(now),
                    key=lambda k: (not k.startswith('model.'), k)):
    if before.get(key, '<absent>') != now.get(key, '<absent>'):
      out.append(f'{key}: {json.dumps(before.get(key, "<absent>"))} in the '
                 f'checkpoint, {json.dumps(now.get(key, "<absent>"))} now')
  return out


def log_restored(step: int, metadata: Mapping[str, Any]) -> None:
  logging.info('Resuming from step %d (data position %s, config %s)', step,
               metadata.get('data_position'), metadata.get('config_name'))
