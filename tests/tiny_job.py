"""A tiny chained job (teacher, then TRACT 16 -> 4 -> 1) for command-line tests:
python -m tract_jax.main --config=tests/tiny_job.py --workdir=DIR"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # noqa: E402


def get_config():
  config = tiny_config('tract')
  config.checkpoint_every = 2
  config.teacher_training.train_steps = 6
  config.log_every = 1
  return config
