"""Retrofit: a MaskIoU head trained alone on top of the Mask R-CNN quickstart.

  python train.py --config configs/mask_rcnn_quickstart_synthetic.py \
      --workdir workdir/mask_rcnn_quickstart_synthetic
  python train.py --config configs/quickstart_synthetic_retrofit.py \
      --workdir workdir/quickstart_synthetic_retrofit

The model is the MS R-CNN quickstart (configs/quickstart_synthetic.py: the
same network plus a MaskIoU head). train.init_checkpoint loads the trained
Mask R-CNN (its final variables); the MaskIoU head, absent from it, keeps its
fresh initialisation. train.trainable_patterns trains that head alone: every
other parameter is frozen (bit-identical after training, no optimizer state).
The MaskIoU targets are made as mmdetection's MaskScoringRoIHead makes them in
training: on the positive RoIs of the training sampler (train-mode RPN
proposals plus the GT boxes), from the mask head's prediction against the
ground-truth mask; so the RPN and box stage run as in training.
"""

import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location(
      'quickstart_synthetic',
      os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   'quickstart_synthetic.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.name = 'quickstart_synthetic_retrofit'
  t = c.train
  t.init_checkpoint = 'workdir/mask_rcnn_quickstart_synthetic/final'
  t.trainable_patterns = ('^params/roi_head/mask_iou_head/',)
  # The head alone: 400 steps of 8 images, lr x0.1 at step 300.
  t.max_steps = 400
  t.warmup_steps = 50
  t.images_per_epoch = 400
  t.epochs = 8
  t.lr_steps_epochs = [6]
  t.checkpoint_every_steps = 200
  return c
