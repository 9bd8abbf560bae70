"""EDM pickle import (tract_jax/import_edm.py) on pickles written here in EDM's byte format, without
torch: `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))` where every
network object is a torch_utils.persistence record carrying module source, containers are
torch.nn.ModuleDict objects, and tensors are `torch._utils._rebuild_tensor_v2` of storages pickled
as `torch.storage._load_from_bytes(<torch.save bytes>)`. The globals are made picklable by stand-in
modules registered in sys.modules only while pickling. The module source embedded in the pickles
writes a marker file and raises: the tests prove it never runs.
"""
import collections
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import tiny_config
from tract_jax import checkpoints, import_edm, import_teacher
from tract_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/demo.py (8x8 digits, 1 channel) with the tiny EDM SongUNet of song_config().
CLI_OVERRIDES = ('--config.model.arch=edm_song', '--config.model.edm.model_channels=16',
                 '--config.model.edm.channel_mult=(1,2)', '--config.model.edm.num_blocks=1',
                 '--config.model.edm.attn_resolutions=(4,)')
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def song_config(**edm):
  config = tiny_config()   # digits: 8x8x1
  config.model.arch = 'edm_song'
  for key, value in dict(model_channels=16, channel_mult=(1, 2), num_blocks=1,
                         attn_resolutions=(4,), **edm).items():
    config.model.edm[key] = value
  return config


def random_params(config, seed=0):
  like = import_teacher.abstract_params(config)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), like)


# ----------------------------------------------------------------------------------------------------
# Writing pickles in EDM's format without torch
# ----------------------------------------------------------------------------------------------------

def _stand_in_function(module, name):
  def never_called(*args):
    raise AssertionError(f'{module}.{name} stand-in called while writing a test pickle')
  never_called.__module__, never_called.__qualname__, never_called.__name__ = module, name, name
  return never_called


def _stand_in_class(module, name, base=object):
  return type(name, (base,), {'__module__': module, '__qualname__': name})


@contextlib.contextmanager
def torch_stand_ins():
  """Modules named like torch's, torch_utils' and dnnlib's, holding picklable stand-ins."""
  names = ('torch', 'torch._utils', 'torch.storage', 'torch.nn', 'torch.nn.modules',
           'torch.nn.modules.container', 'torch_utils', 'torch_utils.persistence', 'dnnlib',
           'dnnlib.util')
  saved = {name: sys.modules.get(name) for name in names}
  mods = {name: types.ModuleType(name) for name in names}
  for module, name in (('torch._utils', '_rebuild_tensor_v2'),
                       ('torch._utils', '_rebuild_parameter'),
                       ('torch.storage', '_load_from_bytes'),
                       ('torch_utils.persistence', '_reconstruct_persistent_obj')):
    setattr(mods[module], name, _stand_in_function(module, name))
  for name in ('FloatStorage', 'HalfStorage'):
    setattr(mods['torch'], name, _stand_in_class('torch', name))
  mods['torch.nn.modules.container'].ModuleDict = _stand_in_class('torch.nn.modules.container',
                                                                 'ModuleDict')
  mods['dnnlib.util'].EasyDict = _stand_in_class('dnnlib.util', 'EasyDict', dict)
  sys.modules.update(mods)
  try:
    yield mods
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


class _Storage:
  """Pickles as torch.storage._load_from_bytes(torch.save bytes of a storage)."""

  def __init__(self, mods, flat, fmt):
    self.mods, self.flat, self.fmt = mods, flat, fmt

  def _storage_pickle(self, key, protocol):
    kind = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage'}[
        self.flat.dtype]
    pid = ('storage', getattr(self.mods['torch'], kind), key, 'cpu', self.flat.size)
    if self.fmt == 'legacy':
      pid += (None,)
    marker = object()
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=protocol)
    pickler.persistent_id = lambda obj: pid if obj is marker else None
    pickler.dump(marker)
    return buf.getvalue()

  def torch_save_bytes(self):
    raw = self.flat.astype(self.flat.dtype.newbyteorder('<')).tobytes()
    if self.fmt == 'zip':
      buf = io.BytesIO()
      with zipfile.ZipFile(buf, 'w') as archive:
        archive.writestr('archive/data.pkl', self._storage_pickle('0', 2))
        archive.writestr('archive/byteorder', 'little')
        archive.writestr('archive/data/0', raw)
      return buf.getvalue()
    key = '94238472010816'
    out = [pickle.dumps(LEGACY_MAGIC, protocol=2), pickle.dumps(1001, protocol=2),
           pickle.dumps({'protocol_version': 1001, 'little_endian': True,
                         'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, protocol=2),
           self._storage_pickle(key, 2), pickle.dumps([key], protocol=2),
           np.int64(self.flat.size).tobytes(), raw]
    return b''.join(out)

  def __reduce__(self):
    return (self.mods['torch.storage']._load_from_bytes, (self.torch_save_bytes(),))


class _Tensor:
  """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

  def __init__(self, mods, array, fmt='legacy', layout='C'):
    self.mods, self.array, self.fmt, self.layout = mods, array, fmt, layout

  def __reduce__(self):
    a = self.array
    if self.layout == 'F':  # column-major data behind a 3-element offset, as a view would have
      f = np.asfortranarray(a)
      flat = np.concatenate([np.full(3, 7, a.dtype), f.ravel(order='K')])
      stride, offset = tuple(s // a.itemsize for s in f.strides), 3
    else:
      a = np.ascontiguousarray(a)
      flat, stride, offset = a.ravel(), tuple(s // a.itemsize for s in a.strides), 0
    return (self.mods['torch._utils']._rebuild_tensor_v2,
            (_Storage(self.mods, flat, self.fmt), offset, a.shape, stride, False,
             collections.OrderedDict()))


class _Parameter:
  def __init__(self, tensor):
    self.tensor = tensor

  def __reduce__(self):
    return (self.tensor.mods['torch._utils']._rebuild_parameter,
            (self.tensor, False, collections.OrderedDict()))


class _Persistent:
  """Pickles as torch_utils.persistence._reconstruct_persistent_obj(meta) with module source."""

  def __init__(self, mods, class_name, state, module_src):
    self.mods, self.class_name, self.state, self.module_src = mods, class_name, state, module_src

  def __reduce__(self):
    meta = dict(type='class', version=6, module_src=self.module_src, class_name=self.class_name,
                state=self.state)
    return (self.mods['torch_utils.persistence']._reconstruct_persistent_obj, (meta,))


def evil_source(marker):
  """Module source that leaves a trace and fails if anything executes it."""
  return (f'import pathlib\npathlib.Path({str(marker)!r}).write_text("executed")\n'
          'raise RuntimeError("the EDM module source was executed")\n')


def _module_state(params=(), buffers=(), modules=(), **extra):
  state = {'training': False, '_parameters': collections.OrderedDict(params),
           '_buffers': collections.OrderedDict(buffers),
           '_non_persistent_buffers_set': set(), '_backward_hooks': collections.OrderedDict(),
           '_forward_hooks': collections.OrderedDict(),
           '_modules': collections.OrderedDict(modules)}
  state.update(extra)
  return state


def _to_edm(array):
  return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T if array.ndim == 2 else array


def edm_pickle(path, flax_params, marker, *, resample_filter=(1, 3, 3, 1), extra=None,
               drop=(), half=(), fortran=(), zip_format=(), network='SongUNet'):
  """Writes flax_params (+ `extra` EDM-named arrays, - `drop`) as an EDM snapshot pickle.

  half / fortran / zip_format: EDM names stored as float16, column-major with an offset, or in
  torch.save's zip format (the rest: float32, contiguous, legacy format, as EDM's pickles have).
  """
  tensors = {'.'.join(p): _to_edm(np.asarray(v)) for p, v in
             traverse_util.flatten_dict(flax_params).items()}
  f = np.asarray(resample_filter, np.float32)
  filt = (np.outer(f, f) / f.sum() ** 2)[None, None]
  for name in list(tensors):   # the resampling layers' filter buffers
    module = name.rsplit('.', 1)[0]
    if (module.endswith(('_down.conv0', '_down.skip', '_up.conv0', '_up.skip'))
        or module.endswith('_aux_residual')) and module + '.resample_filter' not in tensors:
      tensors[module + '.resample_filter'] = filt
  tensors.update(extra or {})
  for name in drop:
    del tensors[name]
  src = evil_source(marker)
  with torch_stand_ins() as mods:
    tree = {}
    for name, array in tensors.items():
      node = tree
      *parents, leaf = name.split('.')
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = array

    def build(prefix, node):
      params, buffers, modules = [], [], []
      for key, value in node.items():
        full = f'{prefix}{key}'
        if isinstance(value, dict):
          modules.append((key, build(full + '.', value)))
          continue
        if full in half:
          value = value.astype(np.float16)
        tensor = _Tensor(mods, value, 'zip' if full in zip_format else 'legacy',
                         'F' if full in fortran else 'C')
        if key in ('freqs', 'resample_filter'):
          buffers.append((key, tensor))
        else:
          params.append((key, _Parameter(tensor)))
      state = _module_state(params, buffers, modules)
      if prefix in ('enc.', 'dec.'):
        module = mods['torch.nn.modules.container'].ModuleDict()
        module.__dict__.update(state)
        return module
      return _Persistent(mods, 'Module', state, src)

    model = build('', tree)
    model.class_name = network
    model.state['_init_kwargs'] = {'model_channels': 16, 'skip_scale': np.float64(np.sqrt(0.5)),
                                   'resample_filter': list(resample_filter)}
    ema = _Persistent(mods, 'EDMPrecond', _module_state(
        modules=[('model', model)], sigma_data=0.5, use_fp16=False,
        _init_args=(), _init_kwargs={'model_type': network, 'sigma_data': np.float64(0.5)}), src)
    data = {'ema': ema,
            'loss_fn': _Persistent(mods, 'EDMLoss', {'P_mean': -1.2, 'P_std': 1.2}, src),
            'augment_pipe': _Persistent(mods, 'AugmentPipe', {'p': 0.12}, src),
            'dataset_kwargs': mods['dnnlib.util'].EasyDict(path='cifar10-32x32.zip', xflip=False)}
    with open(path, 'wb') as f:
      pickle.dump(data, f, protocol=4)
  return path


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------

def _no_trace(marker):
  assert not os.path.exists(marker), 'the embedded module source ran'
  assert not [m for m in sys.modules if m.startswith('_imported_module_')]


@pytest.mark.slow
def test_command_line_import_round_trips_the_weights(tmp_path):
  config = song_config()
  params = random_params(config)
  marker = tmp_path / 'source_ran'
  augment = {'map_augment.weight': np.ones((32, 9), np.float32)}   # the CIFAR-10 pickles' 9 labels
  source = edm_pickle(tmp_path / 'edm-tiny.pkl', params, marker, extra=augment,
                      half=('map_layer1.bias',), fortran=('enc.8x8_block0.conv0.weight',
                                                          'map_layer0.weight'),
                      zip_format=('dec.8x8_aux_conv.weight', 'map_noise.freqs'))
  out = tmp_path / 'teacher'
  cmd = [sys.executable, '-m', 'tract_jax.import_teacher', f'--source={source}',
         '--config=configs/demo.py', *CLI_OVERRIDES, f'--output={out}']
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "from 'ema' (EDMPrecond / SongUNet)" in result.stdout
  assert 'cast map_layer1.bias: float16 -> float32' in result.stdout
  assert 'ignored map_augment.weight: (32, 9): augmentation labels' in result.stdout
  _no_trace(marker)
  with open(out / 'import_info.json') as f:
    info = json.load(f)
  assert info['edm']['network_class'] == 'SongUNet' and info['model']['arch'] == 'edm_song'
  assert info['edm']['init_kwargs'] == {'model_type': 'SongUNet', 'sigma_data': 0.5}  # np.float64
  assert info['report']['ignored'][0][0] == 'map_augment.weight'

  loaded = checkpoints.load_params(str(out), import_teacher.abstract_params(config))
  expected = jax.tree.map(np.asarray, params)
  expected['map_layer1']['bias'] = expected['map_layer1']['bias'].astype(np.float16).astype(
      np.float32)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), expected)


def test_mismatches_are_listed(tmp_path):
  config = song_config()
  params = random_params(config, seed=1)
  marker = tmp_path / 'source_ran'
  extra = {'enc.8x8_block0.extra.weight': np.zeros((4, 4), np.float32),     # unexpected
           'enc.8x8_conv.weight': np.zeros((16, 3, 3, 3), np.float32),       # 3 input channels
           'enc.4x4_down.conv0.resample_filter': np.full((1, 1, 2, 2), 0.25, np.float32)}
  source = edm_pickle(tmp_path / 'bad.pkl', params, marker, extra=extra,
                      drop=('dec.4x4_in1.norm1.weight',))
  with pytest.raises(ConfigError) as info:
    import_edm.import_edm(str(source), config, str(tmp_path / 'out'))
  message = str(info.value)
  assert '\n' not in message
  for expected in ('1 missing: dec.4x4_in1.norm1.weight (32,)',
                   '1 unexpected: enc.8x8_block0.extra.weight (4, 4)',
                   'enc.8x8_conv.weight (16, 3, 3, 3) (expected (16, 1, 3, 3))',
                   'enc.4x4_down.conv0.resample_filter: a 2-tap resampling filter, not the '
                   'configured (1, 3, 3, 1)'):
    assert expected in message, message
  assert not os.path.exists(tmp_path / 'out' / 'ema_params')
  _no_trace(marker)

  # The other EDM network: named in the message, before any mapping.
  other = song_config()
  other.model.arch = 'edm_dhariwal'
  other.model.edm.model_channels = 64   # ADM's heads have 64 channels
  with pytest.raises(ConfigError, match="the pickle's network is EDM's SongUNet; use "
                                        "model.arch='edm_song'"):
    import_edm.import_edm(str(source), other, str(tmp_path / 'out'))
  # A ddpm configuration reads msgpack and says what a pickle needs.
  with pytest.raises(ConfigError, match='looks like a Python pickle.*model.arch=edm_song'):
    import_teacher.import_teacher(str(source), tiny_config(), str(tmp_path / 'out'))


class _Evil:
  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_refused_globals_execute_nothing(tmp_path):
  marker = tmp_path / 'ran'
  data = pickle.dumps({'ema': _Evil(marker)}, protocol=4)
  with pytest.raises(ConfigError) as info:
    import_edm.load_pickle(data, 'source=evil.pkl')
  message = str(info.value)
  assert message.startswith("source=evil.pkl: refused to load global "
                            f"'{os.system.__module__}.system'")
  assert 'runs none of their code' in message and not os.path.exists(marker)

  # Inside the storage bytes too: only torch's storage types are known there.
  inner = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(_Evil(marker), protocol=2)
  with torch_stand_ins() as mods:
    data = pickle.dumps(_ReducesTo(mods, inner), protocol=4)
  with pytest.raises(ConfigError, match="refused to load global '.*system' inside a torch.save"):
    import_edm.load_pickle(data, 'source=x.pkl')
  assert not os.path.exists(marker)

  with pytest.raises(ConfigError, match='not a readable EDM network pickle'):
    import_edm.load_pickle(b'\x80\x04garbage', 'source=x.pkl')
  with pytest.raises(ConfigError, match="no 'ema' network"):
    import_edm.select_network({'net': 1}, 'source=x.pkl')


class _ReducesTo:
  """Pickles as torch.storage._load_from_bytes(data)."""

  def __init__(self, mods, data):
    self.mods, self.data = mods, data

  def __reduce__(self):
    return (self.mods['torch.storage']._load_from_bytes, (self.data,))
