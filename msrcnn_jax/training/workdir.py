"""The training workdir: usable before any work, and one writer at a time.

:func:`prepare` creates the workdir and proves it writable (a probe file),
so a read-only or uncreatable path is refused in one line before the data,
the model or the checkpoint manager are touched.

:class:`WorkdirLock` makes a run the workdir's only writer. Two runs on one
workdir would write the same checkpoint steps, and the second one's orbax
manager removes the first one's unfinished temporary directories (the
``FileNotFoundError`` seen in the first). The lock is ``fcntl.flock`` on
``<workdir>/.lock``, which holds the holder's pid, host and start time:

- another live holder (on any host sharing the filesystem): the second run
  stops with ``WorkdirLockedError`` naming that pid and host;
- a holder that died without releasing (kill -9, a crashed host): the kernel
  has dropped its flock, so the lock is taken over with a warning naming the
  previous holder;
- released when the run ends (also on error); the file is emptied, never
  removed (removing it would let a third run lock a new file while a second
  still holds the old one).

The lock is per process and re-entrant: ``train.py`` takes it before any
work, ``train_and_evaluate`` takes it again for callers that skip
``train.py``. On several hosts only process 0 locks (the trainer decides).
Remote workdirs (``gs://...``) are not locked (no flock there).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time

from absl import logging

from msrcnn_jax.errors import UserError

LOCK_FILE = '.lock'


class WorkdirError(UserError, OSError):
  """The workdir cannot be created or written."""


class WorkdirLockedError(UserError):
  """Another run holds the workdir's lock."""


def prepare(workdir: str) -> str:
  """Creates ``workdir`` if missing and checks it can be written.

  Args:
    workdir: a local path, or a remote one (``gs://...``, created with
      ``etils.epath``; not probed).

  Returns:
    The absolute path (a remote path unchanged).

  Raises:
    WorkdirError: naming the path, if it cannot be created (a parent is a
      file, no permission, read-only filesystem) or written.
  """
  if '://' in workdir:
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    return workdir
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'cannot create the workdir {workdir}: '
                       f'{e.strerror or e}') from e
  probe = os.path.join(workdir, f'.write-probe-{os.getpid()}')
  try:
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    reason = ('read-only filesystem' if e.errno == errno.EROFS else
              e.strerror or str(e))
    raise WorkdirError(f'the workdir {workdir} is not writable ({reason}); '
                       'pass a writable --workdir') from e
  return workdir


def _holder_text(info: dict) -> str:
  since = info.get('started')
  when = (time.strftime(' since %Y-%m-%d %H:%M:%S UTC', time.gmtime(since))
          if isinstance(since, (int, float)) else '')
  return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{when}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:    # alive, another user's
    return True
  return True


# path -> [fd, depth]: the locks this process holds (re-entrant; fd -1:
# held without flock, which the filesystem does not support).
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


class WorkdirLock:
  """The exclusive lock of a local workdir (module docstring), as a
  context manager; ``acquire``/``release`` nest within one process.

  Args:
    workdir: the (existing, writable) workdir; a remote path is not locked.
  """

  def __init__(self, workdir: str):
    self.remote = '://' in workdir
    self.path = (workdir if self.remote else
                 os.path.join(os.path.abspath(workdir), LOCK_FILE))
    self._acquired = False

  def acquire(self) -> None:
    """Takes the lock (or one more level of this process's lock).

    On a filesystem without ``flock`` (ENOLCK, ENOSYS) the run goes on
    unlocked with a warning.

    Raises:
      WorkdirLockedError: another live process holds it; the message names
        its pid and host and the lock file.
      WorkdirError: the lock file cannot be created.
    """
    if self.remote or self._acquired:
      return
    with _HELD_GUARD:
      if self.path in _HELD:
        _HELD[self.path][1] += 1
        self._acquired = True
        return
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise WorkdirError(f'cannot create the lock file {self.path}: '
                           f'{e.strerror or e}') from e
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        info = _read(fd)
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          # A filesystem without flock (some network mounts): run unlocked.
          logging.warning('Cannot lock %s (%s); running without the workdir '
                          'lock: make sure no other run uses this workdir',
                          self.path, e.strerror or e)
          _HELD[self.path] = [-1, 1]
          self._acquired = True
          return
        raise WorkdirLockedError(
            f'the workdir {os.path.dirname(self.path)} is in use by another '
            f'training run ({_holder_text(info)}); wait for it to end or '
            'pass another --workdir (its lock file: '
            f'{self.path})') from None
      previous = _read(fd)
      if previous.get('pid') is not None:
        same_host = previous.get('host') == socket.gethostname()
        alive = same_host and _pid_alive(int(previous['pid']))
        logging.warning(
            'Taking over the lock of %s: a run that ended without releasing '
            'it (%s)', _holder_text(previous),
            'the process is gone' if same_host and not alive else
            'its lock was no longer held')
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(dict(
          pid=os.getpid(), host=socket.gethostname(),
          started=time.time())).encode(), 0)
      os.fsync(fd)
      _HELD[self.path] = [fd, 1]
      self._acquired = True

  def release(self) -> None:
    """Releases one level; the last empties the file and drops the lock."""
    if self.remote or not self._acquired:
      return
    self._acquired = False
    with _HELD_GUARD:
      entry = _HELD.get(self.path)
      if entry is None:
        return
      entry[1] -= 1
      if entry[1] > 0:
        return
      del _HELD[self.path]
      fd = entry[0]
      if fd < 0:            # running unlocked (no flock on this filesystem)
        return
      try:
        os.ftruncate(fd, 0)
      except OSError:
        pass
      finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read(fd: int) -> dict:
  """The holder record of an open lock file ({} if empty or not ours)."""
  try:
    data = os.pread(fd, 4096, 0)
    info = json.loads(data.decode()) if data.strip() else {}
    return info if isinstance(info, dict) else {}
  except (OSError, ValueError):
    return {}
