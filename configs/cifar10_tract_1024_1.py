"""CIFAR-10 TRACT in ONE phase, 1024 -> 1 steps (the schedule ablation of the paper; spec section 5).

  python -m tract_jax.import_teacher \
      --source=gs://gresearch/diffusion-distillation/cifar_original \
      --config=configs/cifar10_tract_1024_1.py --output=~/tract_teachers/cifar10
  python -m tract_jax.main --config=configs/cifar10_tract_1024_1.py \
      --workdir=~/tract_runs/cifar10_tract_1024_1

Same teacher, model, optimiser and total budget as configs/cifar10_tract.py (96 * 2**20 samples at
batch 256), all in one phase: 393,216 steps, evaluation-EMA momentum 1e-3 ** (1 / 393,216).
Every segment is the whole trajectory, so the self-teacher carries the chain from t = 0 upwards.

Hardware: as configs/cifar10_tract.py (8 A100/V100 GPUs or a TPU v3-8 / v4-8, batch 32 per device).
Expected result: the spec lists no FID for this schedule; the paper's two-phase 1024,32,1 run
reaches FID 3.78 at 1 step (spec section 9), the reference this variant is compared with.
"""
from tract_jax import default_config

cifar10_tract = default_config.sibling(__file__, 'cifar10_tract')


def get_config():
  config = cifar10_tract.get_config()
  config.time_schedule = '1024,1'
  config.train_samples = 96 * 2**20         # the same total as the two-phase run
  return config
