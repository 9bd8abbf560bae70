"""data.name: the forms it takes, and the one-line error that lists them (no I/O beyond os.path)."""
import os

from tract_jax.errors import ConfigError

# The named datasets, described once: data.name -> the TFDS dataset it reads (train split, integer
# labels); 'digits' is embedded in the package. data.name also takes 'tfds:NAME', an image folder or
# an .npz file (check_name).
TFDS_NAMES = {'cifar10': 'cifar10', 'imagenet64': 'imagenet_resized/64x64'}
DATASETS = ('digits',) + tuple(TFDS_NAMES)
TFDS_PREFIX = 'tfds:'

ALLOWED = (f"allowed: {', '.join(map(repr, DATASETS))}, 'tfds:NAME' (a TFDS image dataset prepared "
           "in data.data_dir), a directory of .png/.jpg images (optionally one sub-folder per "
           "class), or a .npz file with uint8 'images' (N, H, W[, C]) and optional 'labels'")


def kind(name: str) -> str:
  """'named', 'tfds', 'npz' or 'folder'; ConfigError (one line) otherwise. Only os.path checks."""
  if not isinstance(name, str) or not name:
    raise ConfigError(f'data.name={name!r}: {ALLOWED}')
  name = os.path.expanduser(name)
  if name in DATASETS:
    return 'named'
  if name.startswith(TFDS_PREFIX):
    if not name[len(TFDS_PREFIX):].strip():
      raise ConfigError(f'data.name={name!r}: the TFDS name after {TFDS_PREFIX!r} is empty; '
                        f'{ALLOWED}')
    return 'tfds'
  if name.lower().endswith('.npz'):
    if not os.path.isfile(name):
      raise ConfigError(f'data.name={name!r}: no such .npz file; {ALLOWED}')
    return 'npz'
  if os.path.isdir(name):
    return 'folder'
  if os.path.exists(name):
    reason = 'a file, but not an .npz file'
  elif os.sep in name or name.startswith('.'):
    reason = 'no such directory'
  else:
    reason = 'unknown dataset'
  raise ConfigError(f'data.name={name!r}: {reason}; {ALLOWED}')


def check_name(name: str) -> None:
  """Raises ConfigError (one line, listing what is allowed) unless data.name can name a source.

  Cheap: no dataset is opened (a 'tfds:NAME' is looked up only by load_source).
  """
  kind(name)


def describe_allowed() -> str:
  """One line: the forms data.name accepts."""
  return ALLOWED

