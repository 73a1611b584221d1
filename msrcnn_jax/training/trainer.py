"""``train_and_evaluate(config, workdir)``: the whole training run.

Start-up: check the workdir is writable and lock it (``training/workdir``),
log the devices, build the ``('data',)`` mesh, check the global
batch divides over it, open the checkpoint directory. If it holds a
checkpoint, restore the newest intact one (a damaged newer step is skipped
with a warning, see ``checkpointing``; params, optimizer state, RNG, step) and
restart the data iterator at the saved data position ("Resuming from step
N"); otherwise initialise the model (and merge ``train.init_checkpoint`` if
set). Loop: one jitted step per global batch; every step's scalar metrics are
fetched one step late (so the device never idles) and checked for NaN/Inf;
TensorBoard every ``log_every_steps``, and the console's metric line at about
ten of those steps per run (``console_log_every``; all of them with
``--verbosity=1``; the progress bar shows the latest); checkpoints every
``checkpoint_every_steps`` and at the end; at the end also the final
variables in the converter's format (``<workdir>/final``); ``eval_fn(state)``
every ``eval_every_steps`` and at the end. ``predict``/``evaluate`` take the
workdir, a step directory or ``<workdir>/final`` as ``--checkpoint``.

The task object provides (the detector's is ``msrcnn_jax.training.task.
DetectorTask``):
- ``init_variables(rng, batch) -> {'params': ..., 'batch_stats': ...}``;
- ``loss_fn(params, batch_stats, batch, rng, compute_dtype) -> (loss,
  metrics)``;
- ``frozen_mask(params) -> pytree of bool`` (True = trainable);
- optionally ``eval_fn(state) -> dict`` of scalars.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

from msrcnn_jax import variables as variables_lib
from msrcnn_jax.training import checkpointing
from msrcnn_jax.training import optimizer as optimizer_lib
from msrcnn_jax.training import partitioning
from msrcnn_jax.training import train_step as train_step_lib
from msrcnn_jax.training import workdir as workdir_lib
from msrcnn_jax.training.train_step import TrainState

PyTree = Any
TrainIterFn = Callable[[ml_collections.ConfigDict, int], Iterator[PyTree]]


# ------------------------------------------------------------ init helpers
FINAL_VARIABLES = 'final'   # <workdir>/final: the converter's format


def load_init_checkpoint(path: str, variables: PyTree, replicated,
                         skip_patterns=()) -> tuple[PyTree, dict[str, Any]]:
  """Merges ``train.init_checkpoint`` into freshly initialised variables.

  ``path`` is a converted directory, a training workdir (newest step) or a
  step directory. Strict (``variables.merge_variables``): only leaves the
  checkpoint lacks (a backbone-only checkpoint) or whose path matches
  ``train.init_skip_patterns`` keep their initialisation; each skipped leaf
  is logged with the checkpoint's and the model's shapes.

  Returns:
    ``(merged variables with the ``replicated`` sharding, report)``.

  Raises:
    CheckpointError, VariablesMismatchError: see ``msrcnn_jax.variables``.
  """
  loaded, meta = variables_lib.load_variables(path)
  logging.info('init_checkpoint %s (config %s)', path,
               meta.get('config_name', '?'))
  merged, report = variables_lib.merge_variables(
      variables, loaded, skip_patterns, source=f'init_checkpoint {path}')
  for key, theirs, ours in report['skipped']:
    logging.warning('init_checkpoint: re-initialised %s: checkpoint %s, '
                    'model %s (train.init_skip_patterns)', key,
                    'absent' if theirs is None else theirs, ours)
  logging.info('init_checkpoint %s: loaded %d leaves, %d kept at init%s',
               path, report['num_loaded'], report['num_missing'],
               (' (e.g. ' + ', '.join(report['missing'][:5]) + ')')
               if report['missing'] else '')
  return jax.device_put(merged, replicated), report


def save_final_variables(workdir: str, state: TrainState,
                         config: ml_collections.ConfigDict) -> str | None:
  """Writes ``state``'s params and batch_stats to ``<workdir>/final`` in the
  converter's format (atomically; process 0 only; local workdirs only)."""
  if jax.process_index() != 0:
    return None
  if '://' in workdir:
    logging.warning('No %s/ in remote workdir %s: give predict/evaluate the '
                    'workdir itself (its newest step).', FINAL_VARIABLES,
                    workdir)
    return None
  step = int(jax.device_get(state.step))
  out = variables_lib.save_variables(
      os.path.join(workdir, FINAL_VARIABLES),
      jax.device_get({'params': state.params,
                      'batch_stats': state.batch_stats}),
      dict(config_name=config.name, step=step,
           source=os.path.join(workdir, 'checkpoints', str(step))))
  logging.info('Final variables of step %d -> %s', step, out)
  return out


def _numeric(batch: PyTree) -> PyTree:
  """Drops top-level entries the device cannot hold (strings, objects)."""
  if isinstance(batch, Mapping):
    return {k: v for k, v in batch.items()
            if not (isinstance(v, np.ndarray) and v.dtype.kind in 'OUS')
            and not isinstance(v, (str, bytes))}
  return batch


# ------------------------------------------------------------- the loop
class _MetricLog:
  """Accumulates fetched per-step metrics between log points."""

  def __init__(self):
    self.sums = collections.defaultdict(float)
    self.count = 0
    self.last = {}

  def add(self, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      if k != 'finite':
        self.sums[k] += float(v)
    self.count += 1
    self.last = metrics

  def means(self) -> dict[str, float]:
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    if 'lr' in self.last:         # the lr now, not an average
      out['lr'] = float(self.last['lr'])
    self.sums.clear()
    self.count = 0
    return out


def _make_writer(workdir: str):
  if jax.process_index() != 0:
    return None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    logging.warning('tensorboardX missing: no TensorBoard events')
    return None
  try:
    return SummaryWriter(logdir=workdir)
  except Exception as e:  # pylint: disable=broad-except
    local = os.path.join('tensorboard', os.path.basename(workdir.rstrip('/')))
    logging.warning('No TensorBoard events in %s (%s); writing to %s',
                    workdir, e, local)
    return SummaryWriter(logdir=local)


def _progress(total: int, initial: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, dynamic_ncols=True,
              disable=jax.process_index() != 0, desc='train', unit='step')


def console_log_every(log_every: int, steps: int) -> int:
  """Steps between the console's metric lines: about ten per run.

  A multiple of ``log_every`` (TensorBoard keeps every log step), e.g. 140
  for the quickstart's 1400 steps logged every 20, and ``log_every`` itself
  for runs of up to about 15 log steps.
  """
  return log_every * max(1, round(steps / log_every / 10))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str,
                       task: Any = None,
                       train_iter_fn: TrainIterFn | None = None,
                       eval_fn: Callable[[TrainState], Mapping[str, Any]]
                       | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains (or resumes) per ``config.train``; evaluates if ``eval_fn``.

  Args:
    config: the full config (``msrcnn_jax.config.ms_rcnn_config``).
    workdir: checkpoints go to ``workdir/checkpoints``, TensorBoard events
      to ``workdir``.
    task: init/loss/mask provider (default: ``DetectorTask(config,
      workdir)``).
    train_iter_fn: ``(config, start_step) -> iterator`` of host-local numpy
      batches of ``global_batch_size / process_count`` images, starting at
      global batch number ``start_step`` (default: the task's
      ``train_iter_fn`` if it has one, else
      ``msrcnn_jax.data.pipeline.make_train_iterator``).
    eval_fn: ``eval_fn(state) -> dict`` of scalars (default: the task's
      ``eval_fn`` if it has one).

  Returns:
    ``(final state, {'train': last logged train means, 'eval': last eval
    metrics, 'steps': steps done, 'init_report': init_checkpoint report or
    None, 'preempted': True only if stopped by a preemption/SIGTERM})``.
    On preemption (JAX's preemption sync point or SIGTERM) a checkpoint of
    the current step is written and the function returns early.

  Raises:
    train_step.NonFiniteStepError: (a ``UserError`` and a
      ``FloatingPointError``) on a non-finite loss/gradient, naming the step
      and the loss; no checkpoint is written after the last good step, and
      ``train.py`` ends with one ``error:`` line.
    workdir.WorkdirError: the workdir cannot be created or written.
    workdir.WorkdirLockedError: another run holds the workdir (its lock is
      taken by process 0 for the whole run and released at the end, also
      on error).
    checkpointing.RestoreMismatchError: the newest intact checkpoint does
      not fit the config (names the config keys that changed).
    CheckpointError: the workdir has checkpoints but none is intact (a
      damaged newest step falls back to the newest intact one).
  """
  workdir = workdir_lib.prepare(workdir)
  lock = workdir_lib.WorkdirLock(workdir)
  if jax.process_index() == 0:    # one writer per workdir, for all hosts
    lock.acquire()
  try:
    return _train_and_evaluate(config, workdir, task, train_iter_fn, eval_fn)
  finally:
    lock.release()


def _train_and_evaluate(config, workdir, task, train_iter_fn, eval_fn):
  t = config.train
  logging.info('Devices: %s', partitioning.describe_devices())
  logging.info('Local devices: %s', jax.local_devices())
  mesh = partitioning.make_mesh()
  global_batch = int(t.global_batch_size)
  local_batch = partitioning.check_batch_size(global_batch, mesh)
  logging.info('Global batch %d = %d hosts x %d images; %d devices.',
               global_batch, jax.process_count(), local_batch,
               mesh.devices.size)
  replicated = partitioning.replicated_sharding(mesh)

  if task is None:
    from msrcnn_jax.training.task import DetectorTask  # pylint: disable=g-import-not-at-top
    task = DetectorTask(config, workdir)
  if eval_fn is None:
    eval_fn = getattr(task, 'eval_fn', None)
  if train_iter_fn is None:
    train_iter_fn = getattr(task, 'train_iter_fn', None)
  if train_iter_fn is None:
    from msrcnn_jax.data.pipeline import make_train_iterator  # pylint: disable=g-import-not-at-top
    train_iter_fn = make_train_iterator

  ckpt = checkpointing.Checkpointer(workdir.rstrip('/') + '/checkpoints',
                                    keep=int(t.keep_checkpoints))
  if jax.process_count() == 1:
    # Several hosts rely on JAX's preemption sync point instead, so that all
    # of them save the same step.
    ckpt.catch_sigterm()
  writer = _make_writer(workdir)
  source_iter = pbar = None
  try:
    # The newest step whose files look whole (a damaged newer one is
    # skipped with a warning); its restore below may still fall back.
    latest, meta = ckpt.newest_readable() or (None, {})
    data_position = int(meta.get('data_position', latest or 0))
    batches = source_iter = train_iter_fn(config, data_position)
    first = next(batches)
    batches = itertools.chain([first], batches)

    # ---- state: restore or initialise.
    rng = jax.random.key(int(config.seed))
    init_rng, train_rng = jax.random.split(rng)
    init_batch = jax.tree.map(lambda x: np.asarray(x)[:1], _numeric(first))
    abstract_vars = jax.eval_shape(task.init_variables, init_rng, init_batch)
    mask = task.frozen_mask(abstract_vars['params'])
    tx, schedule_fn = optimizer_lib.make_optimizer(config, mask)
    make_state = jax.jit(
        lambda v, r: train_step_lib.create_train_state(v, tx, r),
        out_shardings=replicated)
    report = None
    if latest is not None:
      template = jax.eval_shape(make_state, abstract_vars, train_rng)
      template = jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                         sharding=replicated), template)
      state, step, meta = ckpt.restore_newest(template, latest, config)
      if step != latest:          # fell back: restart the data there
        if hasattr(source_iter, 'close'):
          source_iter.close()
        data_position = int(meta.get('data_position', step))
        batches = source_iter = train_iter_fn(config, data_position)
      checkpointing.log_restored(step, meta)
    else:
      variables = jax.jit(task.init_variables, out_shardings=replicated)(
          init_rng, init_batch)
      if t.init_checkpoint:
        variables, report = load_init_checkpoint(
            t.init_checkpoint, variables, replicated,
            tuple(t.init_skip_patterns))
      state = make_state(variables, train_rng)
    n_params = sum(int(np.prod(x.shape)) for x in
                   jax.tree.leaves(abstract_vars['params']))
    n_train = sum(int(np.prod(x.shape)) for x, m in zip(
        jax.tree.leaves(abstract_vars['params']), jax.tree.leaves(mask)) if m)
    logging.info('Parameters: %d (%d trainable)', n_params, n_train)

    train_step = train_step_lib.make_train_step(
        task.loss_fn, tx, mesh, compute_dtype=t.get('compute_dtype',
                                                    'float32'),
        schedule_fn=schedule_fn, mask=mask)
    total = optimizer_lib.total_steps(config)
    start = int(jax.device_get(state.step))
    logging.info('Training steps %d -> %d (%d per epoch)', start, total,
                 optimizer_lib.steps_per_epoch(config))

    log_every = max(int(t.log_every_steps), 1)
    console_every = console_log_every(log_every, total - start)
    ckpt_every = int(t.checkpoint_every_steps)
    eval_every = int(t.eval_every_steps)
    mlog = _MetricLog()
    train_means: dict[str, float] = {}
    eval_metrics: dict[str, Any] = {}
    pending = None
    last_saved = start if latest is not None else None
    pbar = _progress(total, start)
    t_last, steps_last = time.time(), 0

    def consume(item):
      step_idx, metrics = item
      host = jax.device_get(metrics)
      train_step_lib.check_finite(host, step_idx)
      mlog.add(host)

    def save(done):
      nonlocal last_saved
      if last_saved == done:
        return
      ckpt.save(state, dict(data_position=data_position,
                            config_name=config.name,
                            global_batch_size=global_batch,
                            config=checkpointing.config_record(config)))
      last_saved = done

    def run_eval(done):
      # Process 0 evaluates the whole split and writes every file; the
      # other hosts wait for it (their share of the data would give partial
      # metrics written over process 0's).
      nonlocal eval_metrics
      if eval_fn is None or eval_every < 0:
        return
      if jax.process_index() == 0:
        logging.info('Evaluating at step %d', done)
        eval_metrics = dict(eval_fn(state) or {})
        logging.info('eval@%d: %s', done, ' '.join(
            f'{k}={float(v):.4g}' for k, v in eval_metrics.items()
            if k in ('bbox_mAP', 'segm_mAP') and np.isscalar(v)) or
                     f'{len(eval_metrics)} metrics')
      else:
        logging.info('Waiting for process 0 to evaluate step %d', done)
      partitioning.wait_for_all_hosts(f'msrcnn_eval_{done}')
      if writer is not None:
        for k, v in eval_metrics.items():
          if np.isscalar(v) or np.ndim(v) == 0:
            writer.add_scalar(f'eval/{k}', float(v), done)
        writer.flush()

    for step_idx in range(start, total):
      try:
        host_batch = next(batches)
      except StopIteration:
        raise RuntimeError(
            f'train iterator ended at data position {data_position} before '
            f'step {total}; it must repeat over epochs') from None
      batch = partitioning.host_batch_to_global(_numeric(host_batch), mesh)
      records = getattr(source_iter, 'last_record_indices', None)
      if records is not None and (step_idx == start or
                                  (step_idx + 1) % log_every == 0):
        # Which records each host read (resume and sharding checks, e.g.
        # tests/test_multiprocess.py): shown with --verbosity=1.
        logging.vlog(1, 'step %d: host %d of %d read records %s', step_idx,
                     jax.process_index(), jax.process_count(),
                     ' '.join(str(int(i)) for i in records))
      t0 = time.time() if step_idx == start else None
      state, metrics = train_step(state, batch)
      data_position += 1
      if pending is not None:
        consume(pending)
      pending = (step_idx, metrics)
      done = step_idx + 1
      if t0 is not None:
        jax.block_until_ready(metrics)
        logging.info('First step (incl. compilation) took %.1f s',
                     time.time() - t0)
      is_log = done % log_every == 0 or done == total
      is_ckpt = (ckpt_every > 0 and done % ckpt_every == 0) or done == total
      is_eval = eval_every > 0 and done % eval_every == 0 and done != total
      if is_log or is_ckpt or is_eval:
        consume(pending)       # all checks done before any save
        pending = None
      pbar.update(1)
      steps_last += 1
      if is_log:
        now = time.time()
        dt = max(now - t_last, 1e-9)
        train_means = mlog.means()
        train_means['images_per_sec'] = global_batch * steps_last / dt
        train_means['sec_per_step'] = dt / steps_last
        eta = (total - done) * dt / steps_last
        pbar.set_postfix(loss=f'{train_means.get("loss", np.nan):.4f}',
                         lr=f'{train_means.get("lr", np.nan):.2e}',
                         gnorm=f'{train_means.get("grad_norm", np.nan):.2f}',
                         ips=f'{train_means["images_per_sec"]:.1f}')
        logging.vlog(
            0 if done % console_every == 0 or done == total else 1,
            'step %d/%d %s eta %s', done, total,
            ' '.join(f'{k}={v:.4g}' for k, v in sorted(train_means.items())),
            time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 86400 else
            f'{eta / 3600:.1f}h')
        if writer is not None:
          for k, v in train_means.items():
            writer.add_scalar(f'train/{k}', v, done)
          writer.flush()
        t_last, steps_last = time.time(), 0
      if is_ckpt:
        save(done)
      if is_eval:
        run_eval(done)
      if ckpt.reached_preemption(done) and done != total:
        if pending is not None:
          consume(pending)
          pending = None
        save(done)
        ckpt.wait_until_finished()
        logging.warning('Preempted: checkpoint of step %d written; rerun '
                        'the same command to resume.', done)
        pbar.close()
        return state, dict(train=train_means, eval=eval_metrics, steps=done,
                           init_report=report, preempted=True)
    if pending is not None:
      consume(pending)
    pbar.close()
    save_final_variables(workdir, state, config)
    run_eval(total)
    ckpt.wait_until_finished()
    if writer is not None:
      writer.flush()
    return state, dict(train=train_means, eval=eval_metrics, steps=total,
                       init_report=report)
  finally:
    if pbar is not None:
      pbar.close()            # before an error line, never redrawn after it
    if hasattr(source_iter, 'close'):
      source_iter.close()     # stops the data pipeline's workers
    ckpt.close()
    if writer is not None:
      writer.close()
