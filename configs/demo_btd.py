"""CPU demo of the BTD (progressive distillation) baseline on the embedded digits: 64 -> 32 -> ... -> 1.

Same model, data and total distillation budget (samples) as configs/demo.py, split over 6 halving
phases instead of 2 TRACT phases. Reuse the TRACT demo's teacher instead of training it again:

  python -m tract_jax.main --config=configs/demo_btd.py --workdir=/tmp/btd_demo \
      --config.teacher_checkpoint=/tmp/tract_demo/teacher
"""
from tract_jax import default_config

demo = default_config.sibling(__file__, 'demo')


def get_config():
  config = demo.get_config()
  config.method = 'btd'
  config.time_schedule = ''                      # derived: 64,32,16,8,4,2,1
  config.train_samples = 6 * 134 * 64            # about the TRACT demo's 800 steps of batch 64
  config.clip_x = True                           # BTD clips only when sampling (spec section 2)
  return config
