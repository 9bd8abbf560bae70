"""Paths a user gives (workdir, teacher_checkpoint, eval outputs, exports): local, or a bucket URL.

Everything goes through `etils.epath.Path`, so `gs://bucket/run` works wherever a local folder does:
epath reaches gs:// through gcsfs (or tf.io.gfile when TensorFlow is installed), and Orbax's array
storage (tensorstore) reads and writes gs:// itself. A bucket has no rename and no append, so:
- small artefacts (config.json, result.json, PNG grids, .npz caches) are written whole; a local file
  goes through a temporary file and a rename, an object store makes an object visible only once its
  upload is complete: either way a crash never leaves a half-written file under the final name;
- Orbax marks a finished checkpoint in a bucket with commit_success.txt (locally: a rename), which
  `checkpoints.is_complete` checks;
- append-only logs (summary.jsonl, TensorBoard events) are kept in a local staging folder and copied
  to the bucket whole (`writers.MetricWriter`);
- fsspec's listing cache is off for buckets: a host that listed the workdir must still see what
  another host (or a later job) wrote there, e.g. the teacher samples process 0 cached.
"""
import importlib.util
import io
import os
import re
from typing import Union

import numpy as np
from etils import epath

from tract_jax.errors import ConfigError

PathLike = Union[str, os.PathLike]

# scheme -> (packages of which one must be importable for etils.epath to reach it, pip hint).
# Orbax's array storage (tensorstore) has its own gs:// and s3:// drivers. Only gs:// is tested (against
# a local GCS emulator, tests/test_gcs.py); s3:// follows the same code path.
BACKENDS = {
    'gs': (('gcsfs', 'tensorflow'), 'pip install gcsfs'),
    's3': (('s3fs',), 'pip install s3fs'),
}

_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


def scheme(path: PathLike) -> str:
  """'gs' for 'gs://bucket/x', '' for a local path."""
  m = _URL.match(os.fspath(path) if not isinstance(path, str) else path)
  return m.group(1).lower() if m else ''


def is_remote(path: PathLike) -> bool:
  return bool(scheme(path))


def check(field: str, path: PathLike) -> None:
  """A one-line ConfigError for a URL that cannot work here: an unknown scheme, or no package that
  reaches it. Local paths and '' pass."""
  if not path:
    return
  name = scheme(str(path))
  if not name:
    if '://' in str(path):
      raise ConfigError(f'{field}={str(path)!r}: not a valid URL (expected gs://BUCKET/PATH)')
    return
  if name not in BACKENDS:
    raise ConfigError(f'{field}={str(path)!r}: {name}:// paths are not supported (local paths, '
                      f'{", ".join(s + "://" for s in BACKENDS)} are)')
  packages, hint = BACKENDS[name]
  if not any(importlib.util.find_spec(p) is not None for p in packages):
    raise ConfigError(f'{field}={str(path)!r}: {name}:// paths need the {packages[0]} package, '
                      f'which is not installed ({hint})')


_configured = False


def _configure_fsspec() -> None:
  """No listing cache for object stores (fsspec reads this when it creates a filesystem)."""
  global _configured
  if _configured:
    return
  _configured = True
  try:
    import fsspec.config
  except ImportError:  # epath uses tf.io.gfile instead (TensorFlow installed, no gcsfs)
    return
  for protocol in ('gs', 's3'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


def resolve(path: PathLike) -> epath.Path:
  """The epath.Path of a user path: '~' expanded and made absolute when local, URLs as given."""
  text = os.fspath(path)
  if is_remote(text):
    _configure_fsspec()
    return path if isinstance(path, epath.Path) else epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def read_bytes(path: PathLike, field: str = 'path') -> bytes:
  """The bytes of a local or remote file. A file that cannot be read is a one-line ConfigError
  naming `field`: no such local file, or, for a URL, what went wrong and what reading one needs."""
  text = os.fspath(path)
  if not is_remote(text):
    local = resolve(text)
    if not local.is_file():
      raise ConfigError(f'{field}={text!r}: no such file')
    return local.read_bytes()
  try:
    return resolve(text).read_bytes()
  except Exception as e:  # noqa: BLE001 - missing gcsfs, no network, no permission, no such object
    detail = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
    packages, hint = BACKENDS.get(scheme(text), ((), ''))
    needs = f'the {packages[0]} package ({hint}), ' if packages else ''
    raise ConfigError(
        f'{field}={text!r}: cannot read it ({detail}). Reading {scheme(text)}:// paths needs '
        f'{needs}network access and read permission on the bucket; or copy the file first '
        f'(gsutil cp {text} .) and pass the local path') from None


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes a file whole, never leaving a partial one under the final name (see the module note);
  creates the parent folder."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(str(path)):
    path.write_bytes(data)  # an object becomes visible only when its upload is complete
  else:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, os.fspath(path))
  return path


def write_text(path: PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode('utf-8'))


def save_npz(path: PathLike, **arrays) -> epath.Path:
  """np.savez to a local or remote path (whole, as write_bytes)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return write_bytes(path, buffer.getvalue())


def load_npz(path: PathLike):
  """np.load of a local or remote .npz, read into memory (a dict-like NpzFile)."""
  return np.load(io.BytesIO(resolve(path).read_bytes()))


def copy_file(source: PathLike, destination: PathLike) -> None:
  """Copies one file (local or remote, either way) whole."""
  write_bytes(destination, resolve(source).read_bytes())


def check_folder(field: str, path: PathLike) -> None:
  """A one-line ConfigError when `path` (or a folder above it) is an existing file, so that a job
  cannot create or use it as its folder. Local paths only: a bucket has no files in the way."""
  if not path or is_remote(str(path)):
    return
  path = resolve(path)
  for candidate in (path, *path.parents):
    if candidate.exists():
      if not candidate.is_dir():
        where = '' if candidate == path else f' ({candidate} is a file)'
        raise ConfigError(f'{field}={str(path)!r}: not a folder{where}; give a folder (it is '
                          'created when missing)')
      return


def _files(folder: epath.Path):
  """Every file under `folder`, recursively (epath has no rglob for buckets, and its walk drops
  the gs:// of the folders it yields)."""
  for entry in folder.iterdir():
    if entry.is_dir():
      yield from _files(entry)
    else:
      yield entry


def move_folder(source: PathLike, destination: PathLike) -> epath.Path:
  """Moves a folder to `destination` (which must not exist), creating its parent.

  Locally one rename. A bucket has no rename: every object is copied, then the source's
  commit_success.txt is deleted first, so that an interrupted move never leaves a source that
  Orbax takes for a finished checkpoint, then the rest.
  """
  source, destination = resolve(source), resolve(destination)
  if not is_remote(str(source)):
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.rename(os.fspath(source), os.fspath(destination))
    return destination
  for file in _files(source):
    target = destination / file.relative_to(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    file.copy(target)
  marker = source / 'commit_success.txt'
  if marker.exists():
    marker.unlink()
  source.rmtree()
  return destination
