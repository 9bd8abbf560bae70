"""CIFAR-10 TRACT, schedule 1024 -> 32 -> 1 (two phases): the paper's main CIFAR-10 run (spec section 5).

  python -m tract_jax.import_teacher \
      --source=gs://gresearch/diffusion-distillation/cifar_original \
      --config=configs/cifar10_tract.py --output=~/tract_teachers/cifar10
  python -m tract_jax.main --config=configs/cifar10_tract.py --workdir=~/tract_runs/cifar10_tract

(teacher_checkpoint below is the import's --output; pass --config.teacher_checkpoint=DIR if you put
the teacher elsewhere.) 96 * 2**20 training samples in total at batch 256: 196,608 steps per phase,
evaluation-EMA momentum 1e-3 ** (1 / 196,608) = 0.99996487.

Hardware: sized like the official code (its README: a cluster of 8 NVIDIA A100 or V100 GPUs), i.e.
batch 256 = 32 per device for 8 devices; a TPU v3-8 / v4-8 works the same way. Each step runs the
60M-parameter UNet forward three times (teacher, self-teacher, student) and backward once.

Expected result (paper, spec section 9): FID 3.78 with 1 step (the final student, phase_1_ema).
The paper's 2-step figure, 3.32, belongs to a run whose schedule ends at 2 steps; this one ends at 1.

Precision: float32 by default, as the paper ran it. On GPU/TPU we recommend
--config.model.dtype=bfloat16 (parameters, EMAs, targets and loss stay float32): measured on one
H200, the TRACT step at batch 256 runs 1,942 images/s in bf16 against 1,088 in float32 (TF32).
On CPU keep float32.
"""
from tract_jax import default_config


def get_config():
  config = default_config.get_config()
  config.method = 'tract'
  config.teacher_checkpoint = '~/tract_teachers/cifar10'
  config.teacher_steps = 1024
  config.time_schedule = '1024,32,1'
  config.train_samples = 96 * 2**20         # TOTAL over both phases (the official train_len=96M)
  config.batch_size = 256
  config.sema = 0.5
  config.ema_residual = 1e-3
  config.ema_reset = 'none'
  config.loss_reduction = 'sum'             # official TRACT code: summed over pixels
  config.clip_x = True

  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip = 1.0

  config.model.mean_type = 'x'              # the CIFAR-10 teacher predicts x (default UNet)
  config.model.out_ch = 3
  config.teacher_training.train_steps = 0   # distil the imported teacher, never train one

  config.data.name = 'cifar10'
  config.data.random_flip = True            # official code: RandomHorizontalFlip
  config.checkpoint_every = 10_000
  config.log_every = 1000
  return config
