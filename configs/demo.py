"""CPU demo on the embedded 8x8 digits: train a small teacher, then TRACT 64 -> 8 -> 1 steps.

  python -m tract_jax.main --config=configs/demo.py --workdir=/tmp/tract_demo

Writes PNG grids of the teacher (64 DDIM steps) and of each phase's student (8 steps, 1 step) from
the same noise into the workdir and prints the teacher-agreement error. Sized for 2 CPU cores.
"""
from tract_jax import default_config


def get_config():
  config = default_config.get_config()
  config.method = 'tract'
  config.teacher_steps = 64
  config.time_schedule = '64,8,1'
  config.batch_size = 64
  # Sized for 5 minutes on 2 CPU cores (issue 23). Against the earlier budget (1,600 teacher steps
  # with EMA 0.999, 2 x 600 TRACT steps), on one 2-core machine (2026-12-06): 6 min 56 s -> 4 min
  # 20 s wall (with the cheaper CPU checkpoints); 1-step student RMSE ratio to the undistilled
  # teacher 0.17 -> 0.19; digits FID teacher 9.40 -> 10.05, 1-step student 10.67 -> 11.38. Phases
  # of 300 steps gave ratio 0.20, a 1,000-step teacher FID 12.97.
  config.train_samples = 2 * 400 * 64   # two phases of 400 steps
  config.loss_reduction = 'sum'
  config.checkpoint_every = 500
  config.log_every = 100

  config.teacher_training.train_steps = 1200
  config.teacher_training.batch_size = 64
  config.teacher_training.learning_rate = 1e-3
  config.teacher_training.warmup_steps = 100
  config.teacher_training.ema_decay = 0.998  # an averaging window of ~500 of the 1,200 steps
  config.teacher_training.dropout = 0.0

  config.optimizer.learning_rate = 2e-4

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
  config.eval_every = 300
  return config
