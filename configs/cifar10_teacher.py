"""CIFAR-10 teacher training (spec section 6): the UNet of the published cifar_original teacher.

  python -m tract_jax.main --config=configs/cifar10_teacher.py --workdir=~/tract_runs/cifar10_teacher

Writes the final EMA to workdir/ema_params, which distillation takes directly:
--config.teacher_checkpoint=~/tract_runs/cifar10_teacher. Only needed without the published teacher
(python -m tract_jax.import_teacher, see configs/cifar10_tract.py), which is what the paper distils.

Hardware: sized for 8 accelerators of 16 GB or more (8 A100/V100 GPUs as in the official TRACT code's
README, or a TPU v3-8 / v4-8): batch 128 = 16 per device, 60,004,099 parameters.
Training length: the spec does not fix it; 800,000 steps at batch 128 is the length DDPM used for its
CIFAR-10 model. Expected result: no number in the paper (it distils the published teacher); its
1024-step DDIM samples are the reference the students are compared against.
"""
from tract_jax import default_config


def get_config():
  config = default_config.get_config()
  config.method = 'teacher'
  config.teacher_steps = 1024                # evaluated with 1024-step DDIM
  config.model.mean_type = 'x'               # x prediction, 3 output channels (the default UNet)
  config.model.out_ch = 3

  config.teacher_training.train_steps = 800_000
  config.teacher_training.batch_size = 128
  config.teacher_training.learning_rate = 2e-4
  config.teacher_training.warmup_steps = 1000
  config.teacher_training.ema_decay = 0.9999
  config.teacher_training.dropout = 0.2
  config.teacher_training.grad_clip = 1.0
  config.teacher_training.loss_reduction = 'mean'   # Google's teacher code: per-pixel mean
  config.teacher_training.time_sampling = 'continuous'

  config.data.name = 'cifar10'
  config.data.random_flip = True
  config.checkpoint_every = 10_000
  config.log_every = 1000
  return config
