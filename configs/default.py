"""The defaults (tract_jax/default_config.py): the CIFAR-10 TRACT job at paper settings.

  python -m tract_jax.main --config=configs/default.py --workdir=DIR
"""
from tract_jax.default_config import get_config  # noqa: F401
