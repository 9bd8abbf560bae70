"""The defaults (tract_jax/default_config.py): the CIFAR-10 TRACT job at paper settings, which needs
a teacher (see configs/cifar10_tract.py for importing the published one):

  python -m tract_jax.main --config=configs/default.py --workdir=DIR --config.teacher_checkpoint=TEACHER
"""
from tract_jax.default_config import get_config  # noqa: F401
