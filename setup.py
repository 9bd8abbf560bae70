"""tract_jax: TRACT (Transitive Closure Time-Distillation) of diffusion models in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges pinned to what was installed and tested together (Python 3.11, 2026-11):
# jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8, tensorflow-datasets 4.9.10,
# ml-collections 1.1.0, chex 0.1.92, numpy 2.4.6, pillow 13.0, tensorboardX 2.6.5, scipy 1.17.1.
# JAX and Flax ranges cover what has run, so an accelerator image keeps its own JAX and CUDA plugin:
#   CPU (tests, demo): Python 3.11, jax/jaxlib 0.10.2, flax 0.12.8 (the last releases for 3.11);
#   GPU (one NVIDIA H200): jax 0.11.2 with the image's CUDA plugin, flax 0.12.10, code unchanged.
#   TPU: not run yet; the tpu extra follows the same range.
JAX_RANGE = '>=0.10.2,<0.12'
INSTALL_REQUIRES = [
    'jax' + JAX_RANGE,
    'jaxlib' + JAX_RANGE,
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'tensorflow-datasets>=4.9.10,<4.10',
    'grain>=0.2.18,<0.3',
    'ml-collections>=1.1.0,<1.2',
    'chex>=0.1.92,<0.2',
    'numpy>=2.4,<2.5',
    'absl-py>=2.1,<3',
    'pillow>=11,<14',
    'importlib_resources>=6',  # tfds.data_source needs it without TensorFlow
    'tensorboardX>=2.6,<2.7',
    'scipy>=1.13,<2',  # FID matrix square root
]

setup(
    name='tract_jax',
    version='0.1.0',
    description='TRACT diffusion distillation (and the BTD baseline) in JAX/Flax, TPU/GPU first.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['tract_jax', 'tract_jax.*']),
    package_data={'tract_jax.assets': ['*.npz', '*.txt'],
                  'tract_jax.evaluation': ['golden/*.npz', 'golden/*.md']},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The notebook test runs notebooks/ with nbclient (tested: nbclient 0.11.0, ipykernel 7.4.0,
        # nbformat 5.11.1).
        # tests/test_gcs.py runs gs:// jobs against gcp-storage-emulator (tested: 2026.7.19, gcsfs
        # 2026.10.1 with fsspec 2026.9.0); without them those tests are skipped.
        # benchmarks/quality_sweep.py draws its plot with matplotlib (tested: 3.11.2).
        # .ci/run runs the slow tier on 2 pytest-xdist workers (tested: pytest 8.4.2, pytest-xdist
        # 3.8.0). pytest stays below 9: xdist 3.8's `--dist loadgroup` renames item._nodeid, which
        # pytest 9.2 no longer reads, so its groups are ignored there (measured: the session's
        # 8-device job then ran on both workers).
        'test': ['pytest>=8.4,<9', 'pytest-xdist>=3.8,<4', 'nbclient>=0.10,<0.12',
                 'ipykernel>=6.29,<8', 'nbformat>=5.10,<6',
                 'gcp-storage-emulator>=2026.7.19,<2027', 'gcsfs>=2026.10.1,<2027',
                 'matplotlib>=3.9,<4'],
        'bench': ['matplotlib>=3.9,<4'],
        # gs:// paths (workdir, teacher, outputs, TFDS data_dir) through etils.epath; TPU VMs get it.
        'gcs': ['gcsfs>=2026.10.1,<2027'],
        'cuda': ['jax[cuda12]' + JAX_RANGE],   # the H200 runs used an image with jax 0.11.2 preinstalled
        'tpu': ['jax[tpu]' + JAX_RANGE, 'gcsfs>=2026.10.1,<2027'],
    },
    license='Apache-2.0',
)
