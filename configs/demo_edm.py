"""CPU demo of TRACT with EDM teachers (docs/SPEC_EDM.md) on the embedded 8x8 digits: trains a small
EDM-parametrised teacher (the DDPM UNet of configs/demo.py as EDM's network F, EDM's loss), then
distils its 40-step sampler into a 1-step student in one phase (the release's schedule 40,1).

  python -m tract_jax.main --config=configs/demo_edm.py --workdir=/tmp/edm_demo

Writes PNG grids of the teacher (40 steps of the section-2 sampler), the 1-step student and the
undistilled 1-step teacher from the same noise, and prints the teacher-agreement RMSE of the student
and of the undistilled teacher at 1 step (both against the teacher's 40-step samples).

Hardware: 2 CPU cores, 4 minutes (measured 2026-11-27 with the cores shared with other jobs: 4 min
0 s wall, about 2 min of teacher training and 1.5 min of TRACT-EDM).
Expected result (that run): student RMSE 0.152, undistilled 1-step teacher 0.460 (ratio 0.33);
offline digits FID 8.4 for the 40-step teacher, 9.1 for the 1-step student, 88.7 for the
undistilled 1-step teacher.
"""
from tract_jax import default_config


def get_config():
  # The DDIM demo's model, data, teacher-training and evaluation settings; the EDM parts below.
  config = default_config.sibling(__file__, 'demo').get_config()
  config.method = 'tract_edm'
  config.parametrisation = 'edm'
  config.teacher_steps = 40
  config.time_schedule = '40,1'
  config.train_samples = 800 * 64   # one phase of 800 steps
  config.loss_reduction = 'mean'    # the release: mean over pixels, weight 1
  config.teacher_training.loss_reduction = 'mean'
  config.optimizer.learning_rate = 1e-3   # the release's Adam, no clipping
  config.optimizer.grad_clip = 0.0
  config.optimizer.warmup_samples = 0
  config.eval_every = 400
  # The teacher the results above were measured with (configs/demo.py has since moved to a shorter
  # teacher to fit 5 minutes on 2 cores).
  config.teacher_training.train_steps = 1600
  config.teacher_training.ema_decay = 0.999
  return config
