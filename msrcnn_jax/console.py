"""What the command-line tools print: quiet libraries, logs above the bars.

``errors.run`` (the entry point of every tool) calls ``configure_logging``
once the flags are parsed:

- INFO and DEBUG records of other libraries (orbax's ~170 lines per
  training run, JAX's ``Unable to initialize backend 'tpu'``, TensorFlow's
  Python logger) are dropped, and so are a few of their warnings that say
  nothing to a user (``NOISE``, e.g. orbax's ``Metadata file does not
  exist`` on every restore of a converted directory); TensorFlow's C++
  start-up notices (oneDNN, CPU instructions) are turned off through
  ``TF_CPP_MIN_LOG_LEVEL`` unless it is set. Our own INFO lines (the
  ``msrcnn_jax`` package and the entry-point script) stay. absl's
  ``--verbosity`` (or ``-v``) given on the command line turns the filter off:
  everything at that level is printed again.
- ``native_notices_hidden`` hides the INFO notices C++ libraries write
  straight to the process's stderr while a block runs (TensorFlow's oneDNN
  notice at import ignores ``TF_CPP_MIN_LOG_LEVEL``); ``export`` imports
  TensorFlow in it.
- Log lines are written with ``tqdm.write``, so an active progress bar is
  cleared, the line printed above it and the bar redrawn below, instead of
  the line being glued onto the end of the bar's line.

``table`` formats the small tables of the end-of-run summaries.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Warnings of other libraries that tell a user nothing they can act on.
NOISE = (
    # orbax, on restoring a directory saved without its checkpoint metadata
    # file (converted variables, <workdir>/final): nothing is missing.
    'Metadata file does not exist',
)


def _is_ours(pathname: str) -> bool:
  """Whether a log record comes from this package or the entry script."""
  path = os.path.abspath(pathname or '')
  if path.startswith(_PACKAGE_DIR + os.sep):
    return True
  main = getattr(sys.modules.get('__main__'), '__file__', None)
  return bool(main) and path == os.path.abspath(main)


class QuietLibrariesFilter(logging.Filter):
  """Keeps our records, other libraries' warnings and errors (less
  ``NOISE``); drops other libraries' INFO and DEBUG records."""

  def filter(self, record: logging.LogRecord) -> bool:
    if _is_ours(record.pathname):
      return True
    if record.levelno < logging.WARNING:
      return False
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not any(n in message for n in NOISE)


class _AboveProgressBars(io.TextIOBase):
  """A text stream that writes whole lines to stderr through
  ``tqdm.write`` (which clears active bars first and redraws them after)."""

  def __init__(self):
    super().__init__()
    self._pending = ''

  def writable(self) -> bool:
    return True

  def write(self, s: str) -> int:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._pending += s
    while '\n' in self._pending:
      line, self._pending = self._pending.split('\n', 1)
      tqdm.write(line, file=sys.stderr)
    return len(s)

  def flush(self) -> None:
    if self._pending:
      self.write('\n')
    sys.stderr.flush()


def _verbosity_asked() -> bool:
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return bool(flags.FLAGS['verbosity'].present)
  except (KeyError, flags.Error):
    return False


def configure_logging(verbose: bool | None = None) -> None:
  """Quiets other libraries' logging and routes log lines above the bars.

  Idempotent. Call after absl has parsed the flags (``errors.run`` does).

  Args:
    verbose: keep every library's records at absl's verbosity (default:
      whether ``--verbosity``/``-v`` was given on the command line).
  """
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if verbose is None:
    verbose = _verbosity_asked()
  handler = absl_logging.get_absl_handler()
  python_handler = handler.python_handler
  if not isinstance(python_handler.stream, _AboveProgressBars) and (
      python_handler.stream in (sys.stderr, sys.__stderr__)):
    python_handler.stream = _AboveProgressBars()
  for f in list(handler.filters):
    if isinstance(f, QuietLibrariesFilter):
      handler.removeFilter(f)
  if not verbose:
    handler.addFilter(QuietLibrariesFilter())
    # TensorFlow's C++ notices at import (oneDNN, CPU instructions, CUDA
    # probes); read when TensorFlow is first imported (export does it late).
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    # OpenCV's decoder warnings ("PNG input buffer is incomplete") repeat
    # what the ImageReadError that follows says, naming the file.
    from cv2.utils import logging as cv2_logging  # pylint: disable=g-import-not-at-top
    cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_ERROR)


# INFO lines of C++ logging (absl / glog style) and what they drag along.
_NATIVE_NOTICE = re.compile(
    r'^(I\d{4} |WARNING: All log messages before absl::InitializeLog|'
    r'To enable the following instructions)')


@contextlib.contextmanager
def native_notices_hidden() -> Iterator[None]:
  """Hides C++ INFO notices written to file descriptor 2 inside the block.

  What the block writes to fd 2 is held in a temporary file and written back
  to stderr afterwards, less the lines of C++ INFO logging (``I1205 ...``,
  absl's ``WARNING: All log messages before absl::InitializeLog() ...``,
  TensorFlow's CPU-instruction notice). Does nothing when ``--verbosity``
  was given or fd 2 cannot be duplicated.
  """
  if _verbosity_asked():
    yield
    return
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:
    yield
    return
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      try:
        sys.stderr.flush()
      finally:
        os.dup2(saved, 2)
        os.close(saved)
      held.seek(0)
      text = held.read().decode('utf-8', errors='replace')
      kept = [line for line in text.splitlines()
              if line.strip() and not _NATIVE_NOTICE.match(line)]
      if kept:
        sys.stderr.write('\n'.join(kept) + '\n')
        sys.stderr.flush()


def table(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None
          ) -> str:
  """Rows as left-aligned columns (floats with 4 significant digits).

  Args:
    rows: sequences of cells (str, int, float or None, printed as '-').
    header: optional column titles, underlined.

  Returns:
    The table, lines joined by newlines (no trailing newline).
  """
  def cell(v):
    if v is None:
      return '-'
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)

  body = [[cell(v) for v in r] for r in rows]
  if header:
    body = [list(header), ['-' * len(h) for h in header]] + body
  if not body:
    return ''
  widths = [max(len(r[i]) for r in body if i < len(r))
            for i in range(max(len(r) for r in body))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in body)
