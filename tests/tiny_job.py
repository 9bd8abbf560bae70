"""The tiny chained job (teacher, then TRACT 16 -> 4 -> 1) for command-line tests and benchmark
smoke runs: python -m tract_jax.main --config=tests/tiny_job.py --workdir=DIR"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import tiny_job_config  # noqa: E402


def get_config():
  return tiny_job_config()
