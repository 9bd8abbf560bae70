"""Shared test setup: CPU only, a per-session persistent compilation cache (many tests build the same
tiny models), and tiny configs."""
import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.get('TRACT_TEST_JAX_CACHE') or os.path.join(tempfile.gettempdir(),
                                                                  'tract_jax_test_cache')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def tiny_config(method='tract', **overrides):
  """A config that trains in seconds on 8x8 digits: one-level UNet with 16 channels."""
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
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.out_ch = 1
  config.model.num_groups = 4
  config.teacher_training.train_steps = 4
  config.teacher_training.batch_size = 8
  config.teacher_training.warmup_steps = 2
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


@pytest.fixture
def tiny():
  return tiny_config
