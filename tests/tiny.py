"""The one tiny model every test, test job and benchmark smoke run uses (so that compiled programs
are shared through the persistent compilation cache), as a plain module: scripts and subprocesses
import it without pytest.

`tiny_config(method, **overrides)`: a job that trains in seconds on the embedded 8x8 digits with a
one-level UNet of 16 channels (attention in the middle block; a second level with resampling blocks
doubled every compile time, and compiles are what the tests spend most on), T = 16 and TRACT
16 -> 4 -> 1 in two phases of 6 steps of batch 8.
"""


def tiny_config(method='tract', **overrides):
  """A default config shrunk to the tiny job; `overrides` are dotted field names (model.ch=8)."""
  from tract_jax import default_config
  config = default_config.get_config()
  config.method = method
  config.teacher_steps = 16
  config.time_schedule = '16,4,1'
  config.batch_size = 8
  config.train_samples = 2 * 6 * 8  # two phases of 6 steps
  config.checkpoint_every = 4
  config.log_every = 2
  config.model.ch = 16
  config.model.emb_ch = 32
  config.model.ch_mult = (1,)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.out_ch = 1
  config.model.num_groups = 4
  config.teacher_training.train_steps = 4
  config.teacher_training.batch_size = 8
  config.teacher_training.warmup_steps = 2
  config.teacher_training.learning_rate = 1e-3  # as the demo's teacher: it learns in few steps
  config.teacher_training.dropout = 0.1
  config.data.name = 'digits'
  config.data.random_flip = False
  config.eval.num_samples = 8
  config.eval.sample_batch = 8
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config


def tiny_job_config():
  """tests/tiny_job.py: the tiny model's whole chained job through the command line (teacher 6
  steps, then TRACT 16 -> 4 -> 1, 12 steps), checkpointing every 2 steps and logging every step."""
  config = tiny_config('tract')
  config.checkpoint_every = 2
  config.teacher_training.train_steps = 6
  config.log_every = 1
  return config


TINY_JOB_TOTAL = 12  # distillation steps of the tiny job
TINY_JOB_TEACHER_STEPS = 6


def tiny_edm_config(**overrides):
  """The tiny model's EDM job: method tract_edm, T = 8, one phase 8 -> 1 of 6 steps of batch 8
  (`overrides` as tiny_config's)."""
  fields = {'parametrisation': 'edm', 'teacher_steps': 8, 'time_schedule': '8,1',
            'loss_reduction': 'mean', 'optimizer.grad_clip': 0.0, 'optimizer.learning_rate': 1e-3,
            'train_samples': 6 * 8}
  return tiny_config('tract_edm', **{**fields, **overrides})


def tiny_edm_job_config():
  """The EDM teacher's training and TRACT-EDM 8 -> 2 -> 1 (three steps a phase): the slow tier's
  end-to-end EDM run, and the programs the EDM benchmark test times (the same compiled steps)."""
  config = tiny_edm_config(time_schedule='8,2,1', train_samples=2 * 3 * 8)
  config.optimizer.warmup_samples = 16
  return config
