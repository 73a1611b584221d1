"""Deterministic, host-sharded, bucketed train/eval batches (numpy).

Train: every epoch ``e`` reorders the data with a permutation seeded by
``(seed, e)``: inside each shape bucket (cfg.data.buckets, chosen from the
image size alone) the images are shuffled and cut into *global* batches
(the last one of a bucket is filled up with images from the start of the
same shuffled bucket, as mmdetection's GroupSampler pads groups), then the
global batches of all buckets are shuffled together. Global batch ``k`` of
epoch ``e`` is training step ``e * steps_per_epoch + k``; host ``p`` of
``P`` takes its slice ``[p * B, (p + 1) * B)``. So the data seen at a step
depends only on (seed, step, global batch size), a resumed run sees the
same data, and every batch has one static image shape. Flips are drawn per
(seed, epoch, image).

Eval: images in source order, grouped by bucket, cut into global batches of
``B * P``; the last batch of a bucket is padded with copies of its first
image marked ``valid = False`` (``eval_plan``, also what ``predict`` uses).
With ``cfg.data.eval_num_buckets = N`` the evaluation buckets are N shapes
chosen from the split's own size histogram (``buckets_from_sizes``).

Decoding and transforms run on a thread pool of ``cfg.data.num_workers``
threads (cv2 and pycocotools release the GIL for the heavy parts) with
``cfg.data.prefetch`` batches in flight.

Bad images: ``build_source`` refuses, before any work, records whose
annotated size resizes to a zero side (``check_image_sizes``); the sources
refuse missing, empty and unrecognised files from their headers. A file
that fails to decode when its batch comes (``image_io.ImageReadError``:
corrupt or truncated data) is skipped with a warning naming it: in
training the next image of the same bucket in index order that decodes
takes its place (with its own flip draw), so batch shapes stay static and
the data of a step still depends only on (seed, step, the files); in
evaluation the entry becomes padding (``valid`` False) and the image is
not evaluated. A run stops with one ``UserError`` once more than
``cfg.data.max_bad_image_fraction`` of the split's images were bad.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from msrcnn_jax.data import coco as coco_lib
from msrcnn_jax.data import image_io
from msrcnn_jax.data import transforms
from msrcnn_jax.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

TRAIN_KEYS = ('image', 'img_shape', 'pad_shape', 'scale_factor', 'gt_boxes',
              'gt_labels', 'gt_valid', 'gt_masks')
EVAL_KEYS = ('image', 'img_shape', 'pad_shape', 'scale_factor', 'ori_shape',
             'image_id', 'valid')


# ---------------------------------------------------------------- sources
def build_source(cfg, train: bool, split: str | None = None):
  """The records of cfg.data.source ('coco' | 'tfds' | 'synthetic').

  Args:
    cfg: the full config.
    train: the training split (filtered) or the evaluation split (all).
    split: overrides cfg.data.train_split / val_split.

  Raises:
    UserError: what the source refuses, and records whose size resizes to
      a zero side (``check_image_sizes``).
  """
  d = cfg.data
  split = split or (d.train_split if train else d.val_split)
  if d.source == 'synthetic':
    from msrcnn_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    seed = d.synthetic.get('seed', 0) if hasattr(d.synthetic, 'get') else 0
    return synthetic.SyntheticDataset('train' if train else 'val',
                                      d.synthetic, seed)
  # mmdetection's _filter_imgs(min_size=32) for training images.
  min_size = int(d.get('min_size', 32))
  if d.source == 'coco':
    source = coco_lib.CocoSource(
        d.coco_dir, split, train, min_size=min_size,
        category_names=dict(zip(d.category_ids, d.class_names)))
  elif d.source == 'tfds':
    from msrcnn_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    source = tfds_builder.TfdsSource(d.tfds_data_dir, split, train,
                                     name=d.get('tfds_name',
                                                'coco_instance_masks'),
                                     min_size=min_size)
  else:
    raise ConfigError(f'unknown config.data.source {d.source!r}; expected '
                      'coco, tfds or synthetic')
  check_image_sizes(source, d, f'split {split!r}')
  return source


def record_name(rec) -> str:
  """``'<path or file name> (image <id>)'``: a record in messages."""
  return (f'{rec.get("path") or rec.get("file_name")} '
          f'(image {rec.get("image_id")})')


def check_image_sizes(source, data_cfg, where: str = 'the data') -> None:
  """Refuses records whose annotated size resizes to a zero side.

  Such an image (e.g. 3000x4 or 1x500 with a small ``data.img_scale``)
  would stop the run in cv2.resize when its batch comes; its size is known
  from the annotations, so it is refused before any work.

  Args:
    source: records with ``height`` / ``width`` (``image_sizes``).
    data_cfg: ``cfg.data`` (img_scale).
    where: the split, for the message.

  Raises:
    transforms.DegenerateImageError: naming the first image (file and id)
      and how many there are.
  """
  sizes = image_sizes(source)
  bad = []
  for i, (h, w) in enumerate(sizes.tolist()):
    try:
      transforms.checked_rescale_size(w, h, data_cfg.img_scale)
    except transforms.DegenerateImageError:
      bad.append(i)
  if bad:
    first = source[bad[0]]
    try:
      transforms.checked_rescale_size(int(first['width']),
                                      int(first['height']),
                                      data_cfg.img_scale, record_name(first))
    except transforms.DegenerateImageError as e:
      more = (f' (and {len(bad) - 1} more image(s) of {where}: '
              f'{", ".join(record_name(source[i]) for i in bad[1:4])}'
              f'{" ..." if len(bad) > 4 else ""})' if len(bad) > 1 else '')
      raise transforms.DegenerateImageError(f'{e}{more}') from None


def image_sizes(source) -> np.ndarray:
  """``(N, 2)`` (height, width) of every record of a source."""
  if hasattr(source, 'image_sizes'):
    return np.asarray(source.image_sizes()).reshape(-1, 2)
  return np.array([[r['height'], r['width']] for r in source],
                  np.int64).reshape(-1, 2)


def _hosts(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else (
        process_index)
    process_count = jax.process_count() if process_count is None else (
        process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in '
                     f'[0, {process_count})')
  return int(process_index), int(process_count)


def padded_sizes(sizes: np.ndarray, data_cfg) -> np.ndarray:
  """``(N, 2)`` (h, w) of original sizes after the test resize and the pad
  to ``size_divisor`` (the network input before bucket padding)."""
  out = []
  for h, w in np.asarray(sizes).reshape(-1, 2):
    new_w, new_h = transforms.rescale_size(int(w), int(h), data_cfg.img_scale)
    out.append(transforms.padded_size(new_h, new_w, data_cfg.size_divisor))
  return np.asarray(out, np.int64).reshape(-1, 2)


def bucket_ids(pad_sizes: np.ndarray, buckets) -> np.ndarray:
  """``(N,)`` index into ``buckets`` of ``transforms.choose_bucket`` of each
  padded size (the smallest-area bucket that fits).

  Raises:
    ValueError: no bucket fits a size.
  """
  buckets = [tuple(int(v) for v in b) for b in buckets]
  return np.array([buckets.index(transforms.choose_bucket(hw, buckets))
                   for hw in np.asarray(pad_sizes).reshape(-1, 2)], np.int64)


def _bucket_cost(pad_sizes, counts, buckets) -> tuple[float, bool]:
  """(pixels of every image in its smallest fitting bucket, all fit)."""
  b = np.asarray(buckets, np.int64).reshape(-1, 2)
  fits = ((b[None, :, 0] >= pad_sizes[:, None, 0])
          & (b[None, :, 1] >= pad_sizes[:, None, 1]))
  area = np.where(fits, (b[:, 0] * b[:, 1])[None], np.iinfo(np.int64).max)
  best = area.min(1)
  ok = bool(fits.any(1).all())
  return float((best.astype(np.float64) * counts).sum()) if ok else np.inf, ok


def buckets_from_sizes(pad_sizes: np.ndarray, num_buckets: int
                       ) -> tuple[tuple[int, int], ...]:
  """Bucket shapes that follow a dataset's size histogram.

  Chooses ``num_buckets`` shapes ``(h, w)``, h among the dataset's padded
  heights and w among its padded widths (an optimal bucket is always such a
  pair), that minimise the total padded pixels when each image runs in its
  smallest fitting bucket: greedy additions starting from the shape that
  covers every image, then single swaps until none helps (a local optimum).

  Args:
    pad_sizes: ``(N, 2)`` padded (h, w) (``padded_sizes``).
    num_buckets: number of compiled shapes wanted (>= 1).

  Returns:
    Up to ``num_buckets`` (H, W), sorted by area (fewer when the data has
    fewer distinct sizes).
  """
  if num_buckets < 1:
    raise ValueError(f'num_buckets must be >= 1, got {num_buckets}')
  sizes, counts = np.unique(np.asarray(pad_sizes, np.int64).reshape(-1, 2),
                            axis=0, return_counts=True)
  cover = (int(sizes[:, 0].max()), int(sizes[:, 1].max()))
  # A bucket is best at the largest height and the largest width of the
  # images it runs: some (h, w) pair of heights and widths of the data.
  cands = [(int(h), int(w)) for h in np.unique(sizes[:, 0])
           for w in np.unique(sizes[:, 1])]
  chosen = [cover]

  def cost(bs):
    return _bucket_cost(sizes, counts, bs)[0]

  while len(chosen) < min(num_buckets, len(cands)):
    best = min((c for c in cands if c not in chosen),
               key=lambda c: cost(chosen + [c]))
    chosen.append(best)
  improved = True
  while improved:
    improved = False
    current = cost(chosen)
    for i in range(len(chosen)):
      for c in cands:
        if c in chosen:
          continue
        trial = chosen[:i] + [c] + chosen[i + 1:]
        if cost(trial) < current:
          chosen, current, improved = trial, cost(trial), True
  # Drop shapes no image uses.
  used = set(bucket_ids(sizes, chosen).tolist())
  chosen = [b for i, b in enumerate(chosen) if i in used]
  return tuple(sorted(chosen, key=lambda b: (b[0] * b[1], b)))


def padding_overhead(pad_sizes: np.ndarray, buckets) -> float:
  """Extra pixels computed in ``buckets`` over the padded sizes themselves
  (what mmdetection computes at batch size 1), as a fraction: 0.1 = 10%.

  Raises:
    ValueError: no bucket fits a size.
  """
  sizes = np.asarray(pad_sizes, np.int64).reshape(-1, 2)
  total, ok = _bucket_cost(sizes, np.ones(len(sizes)), buckets)
  if not ok:
    raise ValueError(f'a padded size of {sizes.tolist()} fits no bucket of '
                     f'{list(buckets)}')
  return total / float((sizes[:, 0] * sizes[:, 1]).sum()) - 1.


def eval_buckets(data_cfg, pad_sizes: np.ndarray):
  """The evaluation buckets: ``cfg.data.buckets``, or with
  ``cfg.data.eval_num_buckets > 0`` that many chosen from the data
  (``buckets_from_sizes``). Logs the padded-pixel overhead of both."""
  n = int(data_cfg.get('eval_num_buckets', 0))
  buckets = tuple(tuple(int(v) for v in b) for b in data_cfg.buckets)
  if n > 0 and len(pad_sizes):
    chosen = buckets_from_sizes(pad_sizes, n)
    try:
      configured = f'{100 * padding_overhead(pad_sizes, buckets):.1f}%'
    except ValueError:
      configured = 'some images fit none'
    logger.info('evaluation buckets %s from the data: %.1f%% padded pixels '
                '(cfg.data.buckets %s: %s)', chosen,
                100 * padding_overhead(pad_sizes, chosen), buckets,
                configured)
    return chosen
  return buckets


# -------------------------------------------------------------- examples
def _load_image(rec) -> np.ndarray:
  img = image_io.load_record_image(rec)
  expected = (int(rec['height']), int(rec['width']))
  if img.shape[:2] != expected:  # sources check headers; this is the rest
    raise image_io.ImageReadError(image_io.size_mismatch_message(
        record_name(rec), expected, img.shape[:2]))
  return img


def train_example(rec, data_cfg, flip: bool, bucket_hw, img_scale=None):
  """One training example from a record; see ``transforms.train_transform``
  (``img_scale``: this image's scale, default ``data_cfg.img_scale``)."""
  img = _load_image(rec)
  return transforms.train_transform(
      img, rec['boxes'], rec['labels'],
      lambda: coco_lib.decode_masks(rec), data_cfg, flip, bucket_hw,
      name=record_name(rec), img_scale=img_scale)


def eval_example(rec, data_cfg, bucket_hw,
                 image: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One evaluation example: ``transforms.test_transform`` + image_id.

  Args:
    image: ``(H, W, 3)`` uint8 pixels to use instead of the record's file
      (the black stand-in of an image that failed to decode).
  """
  ex = transforms.test_transform(
      _load_image(rec) if image is None else image, data_cfg, bucket_hw,
      name=record_name(rec))
  ex['image_id'] = np.int64(rec['image_id'])
  return ex


class BadImageBudget:
  """Counts the images that failed to decode mid-run and when to stop.

  Args:
    source: the split's records (for names and its size).
    fraction: ``cfg.data.max_bad_image_fraction``: the run stops once more
      than ``fraction * len(source)`` distinct images were bad.
    what: 'training' or 'evaluation', for the messages.

  Attributes:
    bad: ``{record index: error message}`` of the images found bad so far.
  """

  def __init__(self, source, fraction: float, what: str):
    self.source = source
    self.fraction = float(fraction)
    self.what = what
    self.bad: dict[int, str] = {}
    self.read: set[int] = set()

  def add(self, read: Sequence[int],
          bad: Sequence[tuple[int, str, int | None]]) -> None:
    """Counts one batch's reads; warns about each newly bad image.

    Args:
      read: record indices decoded.
      bad: ``(record index, error message, index of the record that took
        its place or None)`` of the images that failed.

    Raises:
      UserError: more than the allowed share of images were bad.
    """
    self.read.update(int(i) for i in read)
    for i, message, other in bad:
      if i in self.bad:
        continue
      self.bad[i] = message
      self.read.add(i)
      n = len(self.bad)
      if n <= 10 or n & (n - 1) == 0:  # then at powers of two
        logger.warning(
            '%s: skipped image %s: %s; %s (%d bad image(s) so far; the run '
            'stops at more than data.max_bad_image_fraction=%g of the %d '
            'images)', self.what, self.source[i].get('image_id'), message,
            f'{record_name(self.source[other])} takes its place'
            if other is not None else 'it is not evaluated', n,
            self.fraction, len(self.source))
    if len(self.bad) > self.fraction * len(self.source):
      names = [record_name(self.source[i]) for i in sorted(self.bad)]
      raise UserError(
          f'{len(self.bad)} of the {len(self.read)} images read so far in '
          f'{self.what} are corrupt or truncated ({", ".join(names[:3])}'
          f'{" ..." if len(names) > 3 else ""}); '
          f'data.max_bad_image_fraction={self.fraction:g} allows '
          f'{int(self.fraction * len(self.source))} of the '
          f'{len(self.source)} images. First: {self.bad[min(self.bad)]}. '
          'Replace the files or remove them from the annotations, or raise '
          'data.max_bad_image_fraction')


def _stack(examples: Sequence[dict[str, Any]], keys) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in keys}


class _Prefetcher:
  """Runs per-example jobs of upcoming batches on a thread pool."""

  def __init__(self, jobs_of: Callable[[int], list[Callable[[], Any]]],
               start: int, stop: int | None, num_workers: int,
               prefetch: int):
    self._jobs_of = jobs_of
    self._next = start
    self._stop = stop
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers)
                  if num_workers > 0 else None)
    self._queue = collections.deque()
    self._depth = max(int(prefetch), 0) + 1
    self._fill()

  def _fill(self):
    while len(self._queue) < self._depth and (
        self._stop is None or self._next < self._stop):
      jobs = self._jobs_of(self._next)
      if self._pool is None:
        self._queue.append(jobs)
      else:
        self._queue.append([self._pool.submit(j) for j in jobs])
      self._next += 1

  def next_results(self) -> list[Any]:
    if not self._queue:
      self.close()
      raise StopIteration
    items = self._queue.popleft()
    if self._pool is None:
      results = [j() for j in items]
    else:
      results = [f.result() for f in items]
    self._fill()
    return results

  def close(self):
    if self._pool is not None:
      for items in self._queue:
        for f in items:
          f.cancel()
      self._queue.clear()
      self._pool.shutdown(wait=False)
      self._pool = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter exit
      pass


# ------------------------------------------------------------------ train
class TrainPlan:
  """Which records form each global batch (pure function of seed, step).

  Args:
    bucket_ids: ``(N,)`` bucket index of every record.
    global_batch: images per step over all hosts.
    seed: shuffling seed.
  """

  def __init__(self, bucket_ids: np.ndarray, global_batch: int, seed: int):
    self.bucket_ids = np.asarray(bucket_ids)
    self.global_batch = int(global_batch)
    self.seed = int(seed)
    if len(self.bucket_ids) == 0:
      raise UserError('the training source has no images')
    self.buckets = sorted(set(self.bucket_ids.tolist()))
    counts = [int((self.bucket_ids == b).sum()) for b in self.buckets]
    self.steps_per_epoch = sum(-(-c // self.global_batch) for c in counts)
    self._cache: dict[int, list[tuple[int, np.ndarray]]] = {}

  def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """``[(bucket index, (global_batch,) record indices)]`` of one epoch."""
    if epoch not in self._cache:
      rng = np.random.default_rng([self.seed, int(epoch)])
      chunks = []
      for b in self.buckets:
        members = np.nonzero(self.bucket_ids == b)[0]
        members = members[rng.permutation(len(members))]
        n_chunks = -(-len(members) // self.global_batch)
        filled = np.resize(members, n_chunks * self.global_batch)
        chunks += [(b, c) for c in filled.reshape(n_chunks, -1)]
      order = rng.permutation(len(chunks))
      self._cache = {epoch: [chunks[i] for i in order]}
    return self._cache[epoch]

  def batch(self, step: int) -> tuple[int, int, np.ndarray]:
    """(epoch, bucket index, global record indices) of a training step."""
    epoch, k = divmod(int(step), self.steps_per_epoch)
    b, idx = self.epoch_batches(epoch)[k]
    return epoch, b, idx


def flip_decision(seed: int, epoch: int, index: int, ratio: float) -> bool:
  """The RandomFlip draw of record ``index`` in ``epoch``."""
  if ratio <= 0:
    return False
  return bool(np.random.default_rng([int(seed), int(epoch), int(index), 7])
              .random() < ratio)


def scale_decision(seed: int, epoch: int, index: int,
                   scales) -> tuple[int, int] | None:
  """The multi-scale Resize draw of record ``index`` in ``epoch``: one of
  ``scales`` (``data.train_img_scales``) uniformly, as mmdetection's
  ``Resize(multiscale_mode='value')`` (and ``'range'`` when ``scales``
  lists every short side of the range); None when ``scales`` is empty."""
  if not len(scales):
    return None
  k = np.random.default_rng([int(seed), int(epoch), int(index), 11]).integers(
      len(scales))
  return tuple(int(v) for v in scales[int(k)])


class TrainIterator:
  """Infinite iterator of train batches (see ``make_train_iterator``).

  Attributes:
    step: the step of the next batch.
    last_record_indices: ``(B,)`` source indices of the records in the
      batch returned last (this host's slice of the global batch; an image
      that failed to decode appears as the record that took its place).
    bad_images: the ``BadImageBudget`` of the images that failed to decode.
    steps_per_epoch: global batches per epoch.
    truncated_images: distinct images seen so far with more than
      max_instances instances (only the first max_instances were kept);
      each is counted once however often it is drawn.
  """

  def __init__(self, cfg, source, batch_size_per_host: int, seed: int,
               start_step: int, process_index: int, process_count: int):
    self.data_cfg = cfg.data
    self.source = source
    self.batch_size = int(batch_size_per_host)
    self.process_index, self.process_count = process_index, process_count
    self.seed = int(seed)
    self.buckets = [tuple(int(v) for v in b) for b in cfg.data.buckets]
    self.plan = TrainPlan(bucket_ids(padded_sizes(image_sizes(source),
                                                  cfg.data), self.buckets),
                          self.batch_size * process_count, seed)
    self.steps_per_epoch = self.plan.steps_per_epoch
    self.step = int(start_step)
    self.last_record_indices = None
    self.truncated_images = 0
    self._truncated: set[int] = set()  # record indices
    self._warned = 0
    # Replacements of images that fail to decode: the bucket's members in
    # index order; files known bad are not read again (they would fail
    # again: skipping them changes no batch).
    self._members = {b: np.nonzero(self.plan.bucket_ids == b)[0]
                     for b in self.plan.buckets}
    self._known_bad: dict[int, str] = {}  # record index -> error
    self.bad_images = BadImageBudget(
        source, cfg.data.get('max_bad_image_fraction', 0.0), 'training')
    self._prefetch = _Prefetcher(
        self._jobs, self.step, None, int(cfg.data.get('num_workers', 0)),
        int(cfg.data.get('prefetch', 1)))

  def _mine(self, step: int) -> tuple[int, int, np.ndarray]:
    """(epoch, bucket, this host's record indices) of a step."""
    epoch, b, idx = self.plan.batch(step)
    lo = self.process_index * self.batch_size
    return epoch, b, idx[lo:lo + self.batch_size]

  def _candidates(self, b: int, i: int) -> Iterator[int]:
    """Record ``i``, then the other members of bucket ``b`` in index order
    after it (wrapping)."""
    yield i
    members = self._members[b]
    start = int(np.searchsorted(members, i))
    yield from (int(j) for j in members[start + 1:])
    yield from (int(j) for j in members[:start])

  def _example(self, epoch: int, b: int, i: int):
    """``(record index used, (example, truncated), [(bad index, error)])``:
    record ``i``, or when its file fails to decode the next member of
    bucket ``b`` that decodes (``_candidates``)."""
    ratio = float(self.data_cfg.flip_ratio)
    bad = []
    for j in self._candidates(b, i):
      message = self._known_bad.get(j)
      if message is None:
        try:
          out = train_example(
              self.source[j], self.data_cfg,
              flip_decision(self.seed, epoch, j, ratio), self.buckets[b],
              scale_decision(self.seed, epoch, j,
                             self.data_cfg.get('train_img_scales', ())))
        except image_io.ImageReadError as e:
          message = self._known_bad.setdefault(j, str(e))
        else:
          return j, out, bad
      bad.append((j, message))
    raise UserError(
        f'no image of training bucket {self.buckets[b]} decodes: '
        f'{"; ".join(m for _, m in bad[:3])}')

  def _jobs(self, step: int):
    epoch, b, mine = self._mine(step)
    return [lambda i=int(i): self._example(epoch, b, i) for i in mine]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    jobs = self._prefetch.next_results()
    used = np.array([j for j, _, _ in jobs], np.int64)
    results = [out for _, out, _ in jobs]
    self.bad_images.add(used.tolist(), [(k, message, j) for j, _, bad in jobs
                                        for k, message in bad])
    self.last_record_indices = used
    self.step += 1
    new = {int(i) for i, (_, t) in zip(used, results) if t} - self._truncated
    if new:
      self._truncated |= new
      self.truncated_images = len(self._truncated)
      if self.truncated_images >= 2 * self._warned:
        self._warned = self.truncated_images
        logger.warning(
            '%d distinct training image(s) so far have more than '
            'max_instances=%d instances (latest: image %s); only the '
            'first %d are kept', self.truncated_images,
            self.data_cfg.max_instances,
            ', '.join(str(self.source[i]['image_id']) for i in sorted(new)),
            self.data_cfg.max_instances)
    return _stack([e for e, _ in results], TRAIN_KEYS)

  def close(self):
    self._prefetch.close()


def make_train_iterator(cfg, source=None,
                        batch_size_per_host: int | None = None,
                        seed: int | None = None, start_step: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """Infinite, deterministic, resumable train batches of this host.

  Also usable as the trainer's ``train_iter_fn(config, start_step)``: an
  integer second argument is taken as ``start_step`` (source from the
  config, batch = cfg.train.global_batch_size / process_count, seed =
  cfg.seed).

  Args:
    cfg: the full config (cfg.data is used).
    source: records (list of dicts or an object with ``__len__`` /
      ``__getitem__``, optionally ``image_sizes()``); default
      ``build_source(cfg, train=True)``.
    batch_size_per_host: images per batch on this host (B); default
      cfg.train.global_batch_size // process_count.
    seed: shuffling / flip seed; default cfg.seed.
    start_step: the step of the first batch (resume): the data of step s
      is global batch s of the epoch-seeded order.
    process_index, process_count: host id and count; default jax's.

  Returns:
    A ``TrainIterator`` whose batches are dicts: ``image (B, H, W, 3)
    float32``, ``img_shape (B, 2) int32``, ``pad_shape (B, 2) int32``,
    ``scale_factor (B, 4) float32``, ``gt_boxes (B, G, 4) float32``
    (train scale, padding 0), ``gt_labels (B, G) int32``, ``gt_valid (B, G)
    bool``, ``gt_masks (B, G, M, M) uint8`` (box-aligned crops). (H, W) is
    the batch's bucket; G = max_instances, M = gt_mask_crop_size.
  """
  if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
    start_step, source = int(source), None
  p, n = _hosts(process_index, process_count)
  if source is None:
    source = build_source(cfg, train=True)
  if batch_size_per_host is None:
    global_batch = int(cfg.train.global_batch_size)
    if global_batch % n:
      raise ConfigError(f'config.train.global_batch_size={global_batch} is '
                        f'not divisible by the {n} hosts')
    batch_size_per_host = global_batch // n
  if seed is None:
    seed = int(cfg.get('seed', 0))
  return TrainIterator(cfg, source, batch_size_per_host, seed, start_step,
                       p, n)


# ------------------------------------------------------------------- eval
def eval_plan(bucket_ids: np.ndarray, global_batch: int
              ) -> list[tuple[int, np.ndarray]]:
  """``[(bucket index, (global_batch,) record indices, -1 = padding)]``."""
  plan = []
  for b in sorted(set(np.asarray(bucket_ids).tolist())):
    members = np.nonzero(bucket_ids == b)[0]
    n_chunks = -(-len(members) // global_batch)
    padded = np.full(n_chunks * global_batch, -1, np.int64)
    padded[:len(members)] = members
    plan += [(b, c) for c in padded.reshape(n_chunks, -1)]
  return plan


class EvalIterator:
  """One pass over an evaluation source (see ``make_eval_iterator``).

  Attributes:
    bad_images: the ``BadImageBudget`` of the images that failed to decode
      (each became a padding entry, ``valid`` False).
  """

  def __init__(self, cfg, source, batch_size_per_host: int,
               process_index: int, process_count: int):
    self.data_cfg = cfg.data
    self.source = source
    self.batch_size = int(batch_size_per_host)
    self.process_index = process_index
    pads = padded_sizes(image_sizes(source), cfg.data)
    self.buckets = list(eval_buckets(cfg.data, pads))
    ids = bucket_ids(pads, self.buckets)
    self.plan = eval_plan(ids, self.batch_size * process_count)
    self.num_steps = len(self.plan)
    self.num_images = len(ids)
    self.bad_images = BadImageBudget(
        source, cfg.data.get('max_bad_image_fraction', 0.0), 'evaluation')
    self._prefetch = _Prefetcher(
        self._jobs, 0, self.num_steps, int(cfg.data.get('num_workers', 0)),
        int(cfg.data.get('prefetch', 1)))

  def _jobs(self, step: int):
    b, idx = self.plan[step]
    lo = self.process_index * self.batch_size
    first = int(idx[0])
    jobs = []
    for i in idx[lo:lo + self.batch_size]:
      real = i >= 0
      j = int(i) if real else first

      def job(j=j, real=real):
        rec = self.source[j]
        try:
          ex, bad = eval_example(rec, self.data_cfg, self.buckets[b]), []
        except image_io.ImageReadError as e:
          # A black stand-in of the same size: padding, not evaluated.
          ex = eval_example(rec, self.data_cfg, self.buckets[b],
                            image=np.zeros((int(rec['height']),
                                            int(rec['width']), 3), np.uint8))
          bad, real = [(j, str(e), None)], False
        ex['valid'] = np.bool_(real)
        return ex, j, bad
      jobs.append(job)
    return jobs

  def __len__(self) -> int:
    return self.num_steps

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    jobs = self._prefetch.next_results()
    self.bad_images.add([j for _, j, _ in jobs],
                        [x for _, _, bad in jobs for x in bad])
    return _stack([ex for ex, _, _ in jobs], EVAL_KEYS)

  def close(self):
    self._prefetch.close()


def make_eval_iterator(cfg, source=None, batch_size_per_host: int | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None) -> EvalIterator:
  """One deterministic pass of evaluation batches of this host.

  Every host runs the same number of steps with the same bucket shapes.

  Args:
    cfg: the full config.
    source: records; default ``build_source(cfg, train=False)``.
    batch_size_per_host: default cfg.test.batch_size.
    process_index, process_count: host id and count; default jax's.

  Returns:
    An ``EvalIterator`` (``len`` = steps) of dicts: ``image (B, H, W, 3)
    float32``, ``img_shape``, ``pad_shape``, ``ori_shape`` ``(B, 2) int32``,
    ``scale_factor (B, 4) float32``, ``image_id (B,) int64``, ``valid (B,)
    bool`` (False on padding entries, which repeat a real image).
  """
  p, n = _hosts(process_index, process_count)
  if source is None:
    source = build_source(cfg, train=False)
  if batch_size_per_host is None:
    batch_size_per_host = int(cfg.test.get('batch_size', 1))
  return EvalIterator(cfg, source, batch_size_per_host, p, n)
