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
  config = default_config.get_config()
  config.method = 'tract_edm'
  config.parametrisation = 'edm'
  config.teacher_steps = 40
  config.time_schedule = '40,1'
  config.batch_size = 64
  config.train_samples = 800 * 64   # one phase of 800 steps
  config.loss_reduction = 'mean'    # the release: mean over pixels, weight 1
  config.checkpoint_every = 500
  config.log_every = 100

  config.optimizer.learning_rate = 1e-3   # the release's Adam, no clipping
  config.optimizer.grad_clip = 0.0
  config.optimizer.warmup_samples = 0

  config.teacher_training.train_steps = 1600
  config.teacher_training.batch_size = 64
  config.teacher_training.learning_rate = 1e-3
  config.teacher_training.warmup_steps = 100
  config.teacher_training.ema_decay = 0.999
  config.teacher_training.dropout = 0.0
  config.teacher_training.loss_reduction = 'mean'

  config.model.ch = 32
  config.model.emb_ch = 128
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.num_heads = 1
  config.model.out_ch = 1
  config.model.num_groups = 8

  config.data.name = 'digits'
  config.data.random_flip = False   # digits are not mirror-symmetric
  config.eval.num_samples = 64
  config.eval.metrics = ('agreement', 'digits_fid')
  config.eval_every = 400
  return config
