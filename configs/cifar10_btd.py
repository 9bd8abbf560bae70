"""CIFAR-10 BTD (binary time distillation = progressive distillation), 1024 -> 512 -> ... -> 1 steps.

  python -m tract_jax.import_teacher \
      --source=gs://gresearch/diffusion-distillation/cifar_original \
      --config=configs/cifar10_btd.py --output=~/tract_teachers/cifar10
  python -m tract_jax.main --config=configs/cifar10_btd.py --workdir=~/tract_runs/cifar10_btd

10 halving phases (spec section 4; time_schedule '' derives 1024,512,...,1). Budget: the same TOTAL
as configs/cifar10_tract.py, 96 * 2**20 samples at batch 256, i.e. 39,321 steps per phase, so that
TRACT and BTD are compared at equal training cost on the same teacher and architecture (the
comparison the paper's abstract makes). The official binary_distill.py defaults to train_len=64M
(also a total over all phases); pass --config.train_samples=67108864 to match that instead.
Differences from the official BTD script kept on purpose: the evaluation EMA uses ema_residual like
TRACT (spec section 3; the script uses a fixed momentum 0.9995), and the student starts from the
teacher with the optimiser state carried across phases (spec section 4).

Hardware: as configs/cifar10_tract.py (8 A100/V100 GPUs or a TPU v3-8 / v4-8, batch 32 per device);
a BTD step runs the UNet forward three times (teacher twice, student) and backward once.
Expected result (paper, spec section 9; progressive distillation): FID 9.12 at 1 step, 4.51 at 2,
3.00 at 4, 2.57 at 8 (phase_9_ema, phase_8_ema, phase_7_ema, phase_6_ema).
"""
from tract_jax import default_config

cifar10_tract = default_config.sibling(__file__, 'cifar10_tract')


def get_config():
  config = cifar10_tract.get_config()
  config.method = 'btd'
  config.time_schedule = ''                 # derived: 1024,512,256,...,2,1 (10 phases)
  config.train_samples = 96 * 2**20         # TOTAL over the 10 phases: 39,321 steps per phase
  config.loss_reduction = 'sum'             # official BTD code: summed over pixels
  config.clip_x = True                      # BTD clips only when sampling (spec section 2)
  return config
