"""The detector as a training task: init, loss, trainable mask, evaluation.

``train_and_evaluate`` (``training/trainer.py``) drives any object with this
interface; ``DetectorTask`` is Mask Scoring R-CNN's.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from msrcnn_jax import config as config_lib
from msrcnn_jax.modeling import build
from msrcnn_jax.modeling.backbone import resnet_from_config
from msrcnn_jax.modeling.detector import MaskScoringRCNN
from msrcnn_jax.training import optimizer as optimizer_lib


class DetectorTask:
  """Mask Scoring R-CNN training task.

  Args:
    config: the full config (checked by ``build.validate_config``).
    workdir: where evaluation writes metrics, reports and pictures.
    backbone_fn: builds the backbone (``backbone.resnet_from_config``).
    check_eval_source: read the evaluation split now (False: the task only
      trains, e.g. in benchmarks on random batches).

  Raises:
    ConfigError: naming the config key that cannot work.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               workdir: str | None = None,
               backbone_fn: Callable[..., Any] = resnet_from_config,
               check_eval_source: bool = True):
    build.validate_config(config, backbone_fn)
    self.config = config
    self.workdir = workdir
    self.backbone_fn = backbone_fn
    self.model = build.build_model(config, backbone_fn=backbone_fn)
    self._predictor = None
    from msrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    # Read (and checked) now: a bad evaluation split is refused before
    # training, not after it.
    self._eval_source = (pipeline.build_source(config, train=False)
                         if check_eval_source else None)

  def train_iter_fn(self, config: ml_collections.ConfigDict,
                    start_step: int):
    """The training batches (``pipeline.make_train_iterator``) of a
    dataset whose categories fit the model (``config.check_dataset_classes``,
    checked before the first step)."""
    from msrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    source = pipeline.build_source(config, train=True)
    d = config.data
    name = {'coco': f'{d.coco_dir} ({d.train_split})',
            'tfds': f'{d.tfds_name} in {d.tfds_data_dir} ({d.train_split})',
            'synthetic': 'the synthetic dataset (data.synthetic)'}[d.source]
    config_lib.check_dataset_classes(config, source.cat_ids,
                                     source.class_names, name)
    return pipeline.make_train_iterator(config, source, start_step=start_step)

  def init_variables(self, rng: jax.Array, batch: Any = None,
                     image_hw=(64, 64)) -> dict:
    """Random ``{'params', 'batch_stats'}`` (shapes do not depend on batch)."""
    del batch
    images = jnp.zeros((1,) + tuple(image_hw) + (3,), jnp.float32)
    pad = jnp.asarray([image_hw], jnp.int32)
    return self.model.init(rng, images, pad, method=MaskScoringRCNN.init_all)

  def loss_fn(self, params, batch_stats, batch, rng, compute_dtype=jnp.float32):
    """``(total loss, metrics)`` of a batch. Convolutions and dense layers
    run in ``compute_dtype`` (e.g. bfloat16) on float32 parameters; BN,
    box coding, NMS and the losses stay float32."""
    model = build.build_model(self.config, jnp.dtype(compute_dtype),
                              self.backbone_fn)
    return model.apply({'params': params, 'batch_stats': batch_stats},
                       batch, rng, method=MaskScoringRCNN.losses)

  def frozen_mask(self, params) -> Any:
    """True where mmdetection trains the parameter (frozen stages, BN)."""
    backbone = self.backbone_fn(self.config.model.backbone)
    return optimizer_lib.trainable_mask_from_config(params, self.config,
                                                    backbone.stage_of)

  def eval_fn(self, state) -> dict[str, float]:
    """COCO evaluation of ``state`` on the config's evaluation split.

    Writes ``metrics.json``, the results files, the mask-scoring report and
    ``config.num_vis_images`` pictures to ``<workdir>/eval``; returns the
    scalar metrics (mmdetection's names plus the mask-scoring correlations).
    """
    from msrcnn_jax.evaluation.run import evaluate_model  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.inference import Predictor  # pylint: disable=g-import-not-at-top
    variables = jax.device_get({'params': state.params,
                                'batch_stats': state.batch_stats})
    if self._predictor is None:
      self._predictor = Predictor(self.config, variables)
    self._predictor.variables = variables
    out_dir = os.path.join(self.workdir or '.', 'eval')
    os.makedirs(out_dir, exist_ok=True)
    n_vis = int(self.config.get('num_vis_images', 0))
    metrics, records = evaluate_model(
        self.config, variables, out_dir, source=self._eval_source,
        progress=jax.process_index() == 0, predictor=self._predictor,
        keep_records=n_vis)
    if n_vis and jax.process_index() == 0:
      self._visualize(records[:n_vis], out_dir)
    flat = {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k, v in (metrics.get('mask_scoring') or {}).items():
      if isinstance(v, (int, float)) and v is not None:
        flat[f'mask_scoring/{k}'] = float(v)
    return flat

  def _visualize(self, records, out_dir):
    from msrcnn_jax.data import image_io  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
    by_id = {}
    src = self._eval_source
    for i in range(len(src)):
      if len(by_id) == len(records):
        break
      rec = src[i]
      by_id[int(rec['image_id'])] = rec
    names = getattr(src, 'class_names', self.config.data.class_names)
    vis_dir = os.path.join(out_dir, 'vis')
    os.makedirs(vis_dir, exist_ok=True)
    for r in records:
      src_rec = by_id.get(int(r['image_id']))
      if src_rec is None:
        continue
      rgb = image_io.load_record_image(src_rec)[..., ::-1]
      path = os.path.join(vis_dir, f'{int(r["image_id"]):06d}.png')
      if not config_lib.has_mask_iou_head(self.config):
        r = {k: v for k, v in r.items() if k != 'mask_iou'}  # all 1
      visualize.save_visualization(path, rgb, r, class_names=names,
                                   score_thr=0.3)
    logging.info('Wrote %d pictures to %s', len(records), vis_dir)
