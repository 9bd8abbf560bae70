"""EDM teacher import: an NVlabs/edm network pickle -> an Orbax params checkpoint (docs/SPEC_EDM.md
section 5), without PyTorch and without running the code inside the pickle.

  python -m tract_jax.import_teacher --source=edm-cifar10-32x32-uncond-ve.pkl \
      --config=configs/<edm config>.py --output=~/tract_teachers/edm_cifar10

(import_teacher hands the work to this module when config.model.arch is 'edm_song' or
'edm_dhariwal'.)

EDM saves `dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)` with a plain
`pickle.dump`. Its classes are decorated by torch_utils.persistence, which pickles every network
object as `_reconstruct_persistent_obj(meta)`, where meta carries the module's source code
(`module_src`) and the object's state; unpickling normally exec()s that source. Here the file is
read by a restricted unpickler whose find_class knows an explicit whitelist of globals (`_ALLOWED`)
and refuses everything else with a ConfigError naming the global. `_reconstruct_persistent_obj` is
replaced by a function that keeps meta['state'] and the class name and never looks at module_src;
torch's tensor reconstruction (`_rebuild_tensor_v2`, `_rebuild_parameter`, storages pickled as
`storage._load_from_bytes(torch.save bytes)`, legacy or zip format) is redone with numpy.

The `ema` network's parameters and buffers are then mapped by name onto the configured Flax network
(models/edm_networks.py: the Flax path joined with '.' is the EDM name below the preconditioner's
`model.`), convolution weights OIHW -> HWIO and linear weights (out, in) -> (in, out). Shapes must
match exactly (in EDM's layout); the resampling-filter buffers must equal the configured filter;
`map_augment.weight` (the augmentation-label embedding of the CIFAR-10 pickles, unused when
sampling) is skipped and reported when the configured network has augment_dim 0. Anything else
missing, unexpected or wrongly shaped fails with one message listing them, as for the Google
teachers.
"""
import collections
import io
import math
import pickle
import zipfile
from typing import Any, Dict, Optional, Tuple

import numpy as np

from tract_jax import import_common, paths
from tract_jax.errors import ConfigError

# torch.save's legacy format: these three pickles precede the object (torch/serialization.py).
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _Refused(Exception):
  """A global outside the whitelist (turned into a ConfigError naming the source)."""


# ----------------------------------------------------------------------------------------------------
# Stand-ins for what the pickle names
# ----------------------------------------------------------------------------------------------------

class PersistentObject:
  """What torch_utils.persistence pickled: the class name and the object's state (its __dict__).
  The module source that came with it is dropped unread."""

  def __init__(self, class_name: str, state: Dict[str, Any]):
    self.class_name = class_name
    self.state = state

  def __repr__(self):
    return f'<EDM {self.class_name}>'


def _reconstruct_persistent_obj(meta):
  """Replaces persistence._reconstruct_persistent_obj: keeps the pickled state, executes nothing."""
  if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(
      meta.get('state'), dict):
    raise _Refused('a torch_utils.persistence record without a class state')
  return PersistentObject(str(meta.get('class_name')), meta['state'])


class _TorchModule:
  """An inert torch.nn container (ModuleDict, ...): unpickling only fills its __dict__."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})


class _EasyDict(dict):
  """dnnlib.util.EasyDict (a dict subclass) read as a plain dict."""


class _Marker:
  """A class named in the pickle only as a type tag (torch.Tensor, torch.nn.Parameter)."""

  def __init__(self, name):
    self.name = name


class _StorageType:
  """torch.FloatStorage and friends: only their element dtype matters."""

  def __init__(self, name, dtype):
    self.name, self.dtype = name, np.dtype(dtype)


def _storage_types():
  import ml_dtypes  # a JAX dependency; numpy has no bfloat16
  dtypes = {'Float': np.float32, 'Double': np.float64, 'Half': np.float16,
            'BFloat16': ml_dtypes.bfloat16, 'Long': np.int64, 'Int': np.int32, 'Short': np.int16,
            'Char': np.int8, 'Byte': np.uint8, 'Bool': np.bool_}
  return {('torch', f'{k}Storage'): _StorageType(f'{k}Storage', v) for k, v in dtypes.items()}


class _StorageRef:
  """A storage named by a torch.save persistent id; its bytes are attached once they are read."""

  def __init__(self, dtype, key, offset=0, size=None):
    self.dtype, self.key, self.offset, self.size = dtype, key, offset, size
    self.array: Optional[np.ndarray] = None


def _storage_from_pid(pid) -> _StorageRef:
  """('storage', storage_type, key, location, numel[, view_metadata]) -> a _StorageRef."""
  if not isinstance(pid, tuple) or len(pid) < 5:
    raise _Refused(f'an unknown torch.save persistent id {pid!r:.80}')
  kind = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
  storage_type, key = pid[1], str(pid[2])
  if kind != 'storage' or not isinstance(storage_type, _StorageType):
    raise _Refused(f'an unknown torch.save persistent id {pid!r:.80}')
  view = pid[5] if len(pid) > 5 else None
  if view is not None:  # (view_key, offset, size): a slice of the root storage
    _, offset, size = view
    return _StorageRef(storage_type.dtype, key, int(offset), int(size))
  return _StorageRef(storage_type.dtype, key)


class _InnerUnpickler(pickle.Unpickler):
  """The pickles inside torch.save bytes: storage types only, storages as persistent ids."""

  def __init__(self, f, refs):
    super().__init__(f)
    self._refs = refs
    self._types = _storage_types()

  def find_class(self, module, name):
    if (module, name) in self._types:
      return self._types[(module, name)]
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    raise _Refused(f"global '{module}.{name}' inside a torch.save storage")

  def persistent_load(self, pid):
    ref = _storage_from_pid(pid)
    self._refs.append(ref)
    return ref


def _resolve(ref: _StorageRef, roots: Dict[str, np.ndarray]) -> np.ndarray:
  root = roots.get(ref.key)
  if root is None:
    raise _Refused(f'storage {ref.key!r} has no data in its torch.save bytes')
  if ref.size is None:
    return root
  if ref.offset + ref.size > root.size:
    raise _Refused(f'storage view {ref.key!r} runs past its data')
  return root[ref.offset:ref.offset + ref.size]


def _load_legacy(data: bytes) -> np.ndarray:
  """torch.save(storage, _use_new_zipfile_serialization=False): magic, protocol, sys_info, the
  object, the storage keys, then per key an int64 element count and the raw little-endian data."""
  f = io.BytesIO(data)
  refs = []
  if _InnerUnpickler(f, refs).load() != _LEGACY_MAGIC:
    raise _Refused('storage bytes that are neither a torch.save zip archive nor the legacy format')
  if _InnerUnpickler(f, refs).load() != _LEGACY_PROTOCOL:
    raise _Refused('storage bytes of an unknown torch.save protocol')
  sys_info = _InnerUnpickler(f, refs).load()
  if isinstance(sys_info, dict) and sys_info.get('little_endian') is False:
    raise _Refused('storage bytes written on a big-endian machine')
  result = _InnerUnpickler(f, refs).load()
  keys = _InnerUnpickler(f, refs).load()
  roots = {}
  for key in keys:
    key = str(key)
    dtype = next((r.dtype for r in refs if r.key == key), None)
    if dtype is None:
      raise _Refused(f'storage key {key!r} that no persistent id names')
    header = f.read(8)
    if len(header) != 8:
      raise _Refused('truncated storage bytes')
    numel = int.from_bytes(header, 'little', signed=True)
    raw = f.read(numel * dtype.itemsize)
    if numel < 0 or len(raw) != numel * dtype.itemsize:
      raise _Refused('truncated storage bytes')
    roots[key] = np.frombuffer(raw, dtype)
  if not isinstance(result, _StorageRef):
    raise _Refused('torch.save bytes that hold something other than a storage')
  return _resolve(result, roots)


def _load_zip(data: bytes) -> np.ndarray:
  """torch.save(storage) in the zip format: <prefix>/data.pkl and <prefix>/data/<key> (raw)."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl) != 1:
      raise _Refused('a torch.save zip archive without one data.pkl')
    prefix = pkl[0][:-len('data.pkl')]
    refs = []
    result = _InnerUnpickler(io.BytesIO(archive.read(pkl[0])), refs).load()
    byteorder = prefix + 'byteorder'
    if byteorder in names and archive.read(byteorder).strip() != b'little':
      raise _Refused('storage bytes written on a big-endian machine')
    roots = {}
    for ref in refs:
      record = f'{prefix}data/{ref.key}'
      if record not in names:
        raise _Refused(f'a torch.save zip archive without {record}')
      roots[ref.key] = np.frombuffer(archive.read(record), ref.dtype)
  if not isinstance(result, _StorageRef):
    raise _Refused('torch.save bytes that hold something other than a storage')
  return _resolve(result, roots)


def _load_from_bytes(data):
  """Replaces torch.storage._load_from_bytes: the storage as a 1-D numpy array."""
  if not isinstance(data, (bytes, bytearray)):
    raise _Refused('storage._load_from_bytes without bytes')
  data = bytes(data)
  return _load_zip(data) if data[:4] == b'PK\x03\x04' else _load_legacy(data)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Replaces torch._utils._rebuild_tensor(_v2): a strided view of the storage, copied."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise _Refused('a tensor whose storage is not a torch storage')
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(storage_offset)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise _Refused('a tensor with an invalid size/stride')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if extent > storage.size:
    raise _Refused('a tensor that runs past its storage')
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=[s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """Replaces torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise _Refused('a parameter that is not a tensor')
  return data


def _rebuild_from_type(func, new_type, args, state=None):
  """Replaces torch._tensor._rebuild_from_type(_v2): what `func` rebuilds, the type tag dropped."""
  del new_type, state
  if func not in (_rebuild_tensor, _rebuild_parameter):
    raise _Refused('a tensor rebuilt by an unknown function')
  return func(*args)


def _numpy_globals():
  import numpy._core.multiarray as multiarray
  out = {('numpy', 'dtype'): np.dtype, ('numpy', 'ndarray'): np.ndarray}
  for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    out[(module, 'scalar')] = multiarray.scalar          # np.sqrt(0.5) etc. in the init kwargs
    out[(module, '_reconstruct')] = multiarray._reconstruct
  return out


# Every global an EDM network pickle may name, and what it becomes here. Nothing else is loaded.
_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type,
    ('torch._tensor', '_rebuild_from_type'): _rebuild_from_type,
    ('torch.storage', '_load_from_bytes'): _load_from_bytes,
    ('torch', 'Tensor'): _Marker('torch.Tensor'),
    ('torch.nn.parameter', 'Parameter'): _Marker('torch.nn.Parameter'),
    ('torch.nn.modules.container', 'ModuleDict'): _TorchModule,
    ('torch.nn.modules.container', 'ModuleList'): _TorchModule,
    ('torch.nn.modules.container', 'Sequential'): _TorchModule,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, f):
    super().__init__(f)
    self._allowed = {**_ALLOWED, **_numpy_globals()}

  def find_class(self, module, name):
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    raise _Refused(f"global '{module}.{name}'")


def load_pickle(data: bytes, source: str = 'source') -> Any:
  """The EDM pickle's object tree with numpy arrays for tensors; nothing in it is executed."""
  try:
    return _RestrictedUnpickler(io.BytesIO(data)).load()
  except _Refused as e:
    raise ConfigError(f'{source}: refused to load {e}: the EDM importer reads network pickles with '
                      'a fixed whitelist of globals and runs none of their code') from None
  except Exception as e:  # noqa: BLE001 - truncated/corrupt pickles raise many unrelated types
    raise ConfigError(f'{source}: not a readable EDM network pickle ({type(e).__name__}: '
                      f'{" ".join(str(e).split())[:200]})') from None


# ----------------------------------------------------------------------------------------------------
# The ema network's tensors
# ----------------------------------------------------------------------------------------------------

def _state(obj) -> Optional[Dict[str, Any]]:
  if isinstance(obj, PersistentObject):
    return obj.state
  if isinstance(obj, _TorchModule):
    return obj.__dict__
  return None


def named_tensors(module, prefix: str = '') -> Dict[str, np.ndarray]:
  """{'enc.32x32_conv.weight': array, ...}: parameters and persistent buffers, as state_dict()
  names them."""
  state = _state(module)
  if state is None:
    raise ConfigError(f'expected a torch module at {prefix or "the top"}, found a '
                      f'{type(module).__name__}')
  out = {}
  skip = set(state.get('_non_persistent_buffers_set') or ())
  for field in ('_parameters', '_buffers'):
    for name, value in (state.get(field) or {}).items():
      if value is None or (field == '_buffers' and name in skip):
        continue
      if not isinstance(value, np.ndarray):
        raise ConfigError(f'{prefix}{name}: expected a tensor, found a {type(value).__name__}')
      out[prefix + name] = value
  for name, child in (state.get('_modules') or {}).items():
    if child is not None:
      out.update(named_tensors(child, f'{prefix}{name}.'))
  return out


def _jsonable(value, depth=0):
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)) and depth < 3:
    return [_jsonable(v, depth + 1) for v in value]
  if isinstance(value, dict) and depth < 3:
    return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
  return repr(value)[:100]


def select_network(tree, source: str = 'source') -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """The 'ema' network's tensors (named below a preconditioner's 'model.') and a description."""
  if not isinstance(tree, dict) or 'ema' not in tree:
    keys = sorted(map(str, tree))[:12] if isinstance(tree, dict) else type(tree).__name__
    raise ConfigError(f"{source}: no 'ema' network (an EDM snapshot pickle holds "
                      f"dict(ema=..., loss_fn=..., ...); found {keys})")
  ema = tree['ema']
  tensors = named_tensors(ema)
  state = _state(ema) or {}
  info = {'ema_class': getattr(ema, 'class_name', type(ema).__name__),
          'init_kwargs': _jsonable(state.get('_init_kwargs') or {})}
  inner = (state.get('_modules') or {}).get('model')
  if inner is not None and tensors and all(k.startswith('model.') for k in tensors):
    tensors = {k[len('model.'):]: v for k, v in tensors.items()}
    info['network_class'] = getattr(inner, 'class_name', type(inner).__name__)
  else:
    info['network_class'] = info['ema_class']
  if not tensors:
    raise ConfigError(f"{source}: the 'ema' network holds no tensors")
  return tensors, info


# ----------------------------------------------------------------------------------------------------
# Mapping onto the Flax network
# ----------------------------------------------------------------------------------------------------

def _edm_shape(flax_shape) -> Tuple[int, ...]:
  """The shape EDM stores for a Flax leaf: HWIO -> OIHW, (in, out) -> (out, in)."""
  s = tuple(flax_shape)
  if len(s) == 4:
    return (s[3], s[2], s[0], s[1])
  if len(s) == 2:
    return (s[1], s[0])
  return s


def _to_flax(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


def convert_tensors(tensors: Dict[str, np.ndarray], target_abstract,
                    resample_filter=(1, 1)) -> Tuple[Dict[str, Any], import_common.ImportReport]:
  """EDM-named tensors -> the Flax tree of `target_abstract` (arrays or ShapeDtypeStructs).

  Exact shapes (in EDM's layout) are required; float16/float64 are cast. Resampling-filter buffers
  must equal `resample_filter`'s 2-D filter; map_augment is skipped when the target has none.
  Raises ConfigError listing every missing, unexpected and wrongly-shaped entry.
  """
  import jax.numpy as jnp
  from flax import traverse_util

  from tract_jax.models.edm_networks import edm_state_dict_name

  source = dict(tensors)
  target = traverse_util.flatten_dict(target_abstract)
  report = import_common.ImportReport()
  flat, missing, wrong = {}, [], []
  for path, spec in target.items():
    name = edm_state_dict_name(path)
    want = _edm_shape(spec.shape)
    if name not in source:
      missing.append(f'{name} {want}')
      continue
    array = source.pop(name)
    if array.shape != want:
      wrong.append(f'{name} {array.shape} (expected {want})')
      continue
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16'):
      wrong.append(f'{name} dtype {array.dtype} (expected {np.dtype(spec.dtype)})')
      continue
    if array.dtype != np.dtype(spec.dtype):
      report.cast.append((name, str(array.dtype), str(np.dtype(spec.dtype))))
    flat[path] = jnp.asarray(_to_flax(array), dtype=spec.dtype)

  f = np.asarray(resample_filter, np.float64)
  expected_filter = np.outer(f, f) / np.square(f.sum())
  for name in [n for n in source if n.split('.')[-1] == 'resample_filter']:
    buffer = source.pop(name)
    if (buffer.size != expected_filter.size or buffer.shape[-2:] != expected_filter.shape
        or not np.allclose(buffer.reshape(expected_filter.shape), expected_filter, atol=1e-6)):
      taps = buffer.shape[-1] if buffer.ndim else 0
      wrong.append(f'{name}: a {taps}-tap resampling filter, not the configured '
                   f'{tuple(resample_filter)}')
  if not any(p[0] == 'map_augment' for p in target):
    for name in [n for n in source if n.startswith('map_augment.')]:
      report.ignored.append((name, f'{source.pop(name).shape}: augmentation labels, unused when '
                             'sampling (model.edm.augment_dim=0)'))
  unexpected = [f'{name} {array.shape}' for name, array in source.items()]
  if missing or unexpected or wrong:
    raise import_common.mismatch_error(
        missing, unexpected, wrong,
        'check model.arch and model.edm (model_channels, channel_mult, num_blocks, '
        'attn_resolutions, ...), model.num_classes and model.out_ch')
  report.num_leaves = len(flat)
  report.num_params = int(sum(math.prod(a.shape) for a in flat.values()))
  return traverse_util.unflatten_dict(flat), report


_ARCH_CLASSES = {'edm_song': 'SongUNet', 'edm_dhariwal': 'DhariwalUNet'}
ARCHS = tuple(_ARCH_CLASSES)  # the model.arch values whose teachers come as EDM pickles


def import_edm(source: str, config, output: str) -> import_common.ImportReport:
  """Reads the EDM pickle `source`, maps its ema network onto config.model and writes
  output/ema_params."""
  from tract_jax import data
  from tract_jax.models import factory

  if not output:
    raise ConfigError('output: give the directory to write the teacher checkpoint to')
  arch = config.model.arch
  if arch not in _ARCH_CLASSES:
    raise ConfigError(f"model.arch={arch!r}: EDM pickles import into 'edm_song' or 'edm_dhariwal'")
  image_shape = data.image_shape(config.data)
  target = import_common.abstract_params(config, image_shape)  # a bad config fails before reading
  model = factory.build_model(config.model)
  tree = load_pickle(paths.read_bytes(source, 'source'), f'source={source!r}')
  tensors, info = select_network(tree, f'source={source!r}')
  if info['network_class'] in _ARCH_CLASSES.values() and (
      info['network_class'] != _ARCH_CLASSES[arch]):
    other = {v: k for k, v in _ARCH_CLASSES.items()}[info['network_class']]
    raise ConfigError(f"model.arch={arch!r}: the pickle's network is EDM's "
                      f"{info['network_class']}; use model.arch={other!r}")
  params, report = convert_tensors(tensors, target,
                                   getattr(model, 'resample_filter', (1, 1)))
  report.subtree = f"'ema' ({info['ema_class']} / {info['network_class']})"
  import_common.write_import(output, params, source, config, image_shape, report, edm=info)
  return report
