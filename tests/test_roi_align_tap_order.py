"""RoIAlign's tap loop (RoIs sorted by tap count, each RoI over its own slot
pairs, a batch-wide bound per chunk) gives bit-identical outputs to the loop
it replaced (each chunk looping over its ``max ny x max nx`` slot grid)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrcnn_jax.ops import roi_align as ra


@jax.jit
def _grid_pool(flat, rowoff, wy, rx, wx):
  """The replaced loop, chunk by chunk: tap ``t`` is the chunk-wide slot
  pair ``(t // max nx, t % max nx)`` for every RoI, ``max ny * max nx``
  taps (msrcnn_jax before the tap-count order)."""
  def chunk(a):
    rowoff, wy, rx, wx = a
    my, mx = jnp.max(ra._used_slots(wy)), jnp.max(ra._used_slots(wx))
    pick = lambda a, j: jax.lax.dynamic_index_in_dim(a, j, 2, keepdims=False)

    def step(t, acc):
      k, l = t // mx, t % mx
      idx = pick(rowoff, k)[:, :, None] + pick(rx, l)[:, None, :]
      w = pick(wy, k)[:, :, None] * pick(wx, l)[:, None, :]
      return acc + w[..., None] * jnp.take(
          flat, idx, axis=0, mode='clip').astype(jnp.float32)
    acc = jnp.zeros(rowoff.shape[:2] + (rx.shape[1], flat.shape[-1]),
                    jnp.float32)
    return jax.lax.fori_loop(0, my * mx, step, acc)
  return jax.lax.map(chunk, (rowoff, wy, rx, wx))


def _boxes(rng, n, h, w):
  """Random boxes of every kind in an image of h x w input pixels: tiny to
  wider than the image, elongated, degenerate (zero or negative size),
  outside the image, and exact duplicates (ties of the sort key)."""
  size = np.exp(rng.uniform(np.log(.5), np.log(2 * max(h, w)), n))
  ratio = np.exp(rng.uniform(-np.log(12), np.log(12), n))
  bw, bh = size * np.sqrt(ratio), size / np.sqrt(ratio)
  x1 = rng.uniform(-.2 * w, w, n)
  y1 = rng.uniform(-.2 * h, h, n)
  boxes = np.stack([x1, y1, x1 + bw, y1 + bh], -1)
  boxes[:5, 2] = boxes[:5, 0]                       # zero width
  boxes[5:10, 3] = boxes[5:10, 1] - 3.              # negative height
  boxes[10:15] = boxes[15:20]                       # duplicates
  boxes[20:25] = [w + 50, h + 50, w + 90, h + 80]   # outside the image
  return boxes.astype(np.float32)


@pytest.mark.parametrize('out,max_samples,chunk', [(7, 16, 16), (14, 4, 90),
                                                   (7, 8, 1)])
def test_tap_loop_bit_identical_to_grid_loop(out, max_samples, chunk):
  """Same slots into both loops; also with a bound above the chunk's own
  (as a batch gives it): identical bits."""
  rng = np.random.default_rng(out + chunk)
  hh, ww, n = 37, 53, 90
  flat = jnp.asarray(rng.normal(size=(hh * ww, 5)), jnp.float32)
  boxes = jnp.asarray(_boxes(rng, n, hh * 8, ww * 8))
  slots, chunk_taps, _ = jax.jit(functools.partial(
      ra._sorted_chunks, spatial_scale=.125, output_size=out,
      max_samples=max_samples, sampling_ratio=0, aligned=True,
      chunk=chunk))(
          boxes, valid_h=jnp.full((n,), 33), valid_w=jnp.full((n,), 50),
          row_stride=jnp.full((n,), ww), base=jnp.zeros((n,), jnp.int32))
  assert int(jnp.min(slots[-1])) == 0  # degenerate RoIs: no taps
  ref = np.asarray(_grid_pool(flat, *slots[:4]))
  pool = jax.jit(ra._pool_chunks)
  for bounds in (chunk_taps, chunk_taps + 5):
    got = np.asarray(pool(flat, *slots, bounds))
    np.testing.assert_array_equal(got, ref)


def test_batch_bound_bit_identical_and_same_gradient():
  """A batch shares each chunk's bound (the largest over the images): the
  extra taps of an image add zeros, so outputs equal the image alone, and
  the feature gradient equals the images' own."""
  rng = np.random.default_rng(3)
  bsz, n = 3, 40
  feats = [jnp.asarray(rng.normal(size=(bsz, 64 // s, 96 // s, 4)),
                       jnp.float32) for s in (4, 8, 16, 32)]
  boxes = np.stack([_boxes(rng, n, 64, 96) for _ in range(bsz)])
  boxes[1] *= .3   # one image of small RoIs: fewer taps than the others
  boxes = jnp.asarray(boxes)
  pad = jnp.asarray([[64, 96], [64, 80], [48, 96]], jnp.int32)
  cot = jnp.asarray(rng.normal(size=(bsz, n, 7, 7, 4)), jnp.float32)

  def loss(f, b, p, c):
    return jnp.sum(ra.multilevel_roi_align(f, b, p, chunk=16) * c)

  pool = jax.jit(lambda f, b, p: ra.multilevel_roi_align(f, b, p, chunk=16))
  grad = jax.jit(jax.grad(loss))
  got = pool(feats, boxes, pad)
  grads = grad(feats, boxes, pad, cot)
  for i in range(bsz):
    one = [f[i:i + 1] for f in feats]
    alone = pool(one, boxes[i:i + 1], pad[i:i + 1])
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(alone[0]))
    g_alone = grad(one, boxes[i:i + 1], pad[i:i + 1], cot[i:i + 1])
    for g, ga in zip(grads, g_alone):
      np.testing.assert_allclose(np.asarray(g[i]), np.asarray(ga[0]),
                                 rtol=1e-6, atol=1e-6)
