"""Teacher import: synthetic checkpoints in the published msgpack format -> Orbax params.

The files are written exactly like the published progressive-distillation teachers: a msgpack of a
train-state dict whose 'ema_params' holds flat module names ('down_0.block_0', 'mid.attn_1', ...),
here for a small UNet (8x8x1, ch 16) with random values in every leaf.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from conftest import tiny_config
from tract_jax import checkpoints, data, import_teacher, paths
from tract_jax.models import factory
from tract_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/demo.py (8x8 digits, ch_mult (1, 2), one res block, attention at 4 px) made smaller.
SMALL_OVERRIDES = ('--config.model.ch=16', '--config.model.emb_ch=32', '--config.model.num_groups=4')


def small_config(conditional=False):
  config = tiny_config(**{'model.ch_mult': (1, 2), 'model.attn_resolutions': (4,)})
  if conditional:
    config.model.num_classes = 10
    config.model.mean_type = 'both'
    config.model.out_ch = 2
  return config


def random_params(config, seed=0):
  """The real tree of the configured UNet with random values in every leaf (no zero-init leaves)."""
  like = import_teacher.abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten(like)
  rng = np.random.default_rng(seed)
  values = [(0.2 * rng.standard_normal(leaf.shape)).astype(np.float32) for leaf in leaves]
  return jax.tree_util.tree_unflatten(treedef, values)


def published_file(path, ema_params, drift=True):
  """Writes a train state as the published teachers are stored; optionally with drifted leaves."""
  ema = jax.tree.map(np.array, ema_params)
  if drift:
    attn = ema['mid.attn_1']
    channels = attn['q']['kernel'].shape[0]
    attn['q']['kernel'] = attn['q']['kernel'].reshape(channels, -1)   # (C, heads * head_dim)
    attn['k']['bias'] = attn['k']['bias'].reshape(-1)                  # (heads * head_dim,)
  state = {
      'step': np.int64(123456),
      'params': jax.tree.map(lambda x: x + 1.0, ema),
      'ema_params': ema,
      'optimizer_state': {'count': np.int64(123456), 'mu': jax.tree.map(np.zeros_like, ema)},
  }
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(state))
  return path


def network_outputs(config, params):
  model = factory.build_model(config.model)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 1)), jnp.float32)
  logsnr = jnp.asarray([-5.0, 0.0, 7.0])
  labels = jnp.asarray([0, 3, 9]) if config.model.num_classes else None
  return np.asarray(model.apply({'params': params}, x, logsnr, labels, train=False))


def run_cli(*args):
  cmd = [sys.executable, '-m', 'tract_jax.import_teacher', *args]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_command_line_import_matches_source_outputs(tmp_path):
  config = small_config()
  params = random_params(config)
  source = published_file(tmp_path / 'cifar_original', params)
  out = tmp_path / 'teacher'
  result = run_cli(f'--source={source}', '--config=configs/demo.py', *SMALL_OVERRIDES,
                   f'--output={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reshaped mid.attn_1/q/kernel' in result.stdout
  assert 'reshaped mid.attn_1/k/bias' in result.stdout
  assert os.path.isdir(out / 'ema_params') and os.path.exists(out / 'import_info.json')

  loaded = checkpoints.load_params(str(out), import_teacher.abstract_params(config))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  np.testing.assert_array_equal(network_outputs(config, loaded), network_outputs(config, params))


@pytest.mark.slow
def test_command_line_mismatch_is_one_clean_line(tmp_path):
  config = small_config()
  ema = jax.tree.map(np.array, random_params(config))
  del ema['mid.block_2']['norm1']                           # missing
  ema['up_0.block_1']['extra_dense'] = {'kernel': np.zeros((4, 4), np.float32)}  # unexpected
  ema['conv_in']['kernel'] = np.zeros((3, 3, 3, 16), np.float32)   # 3 input channels, not 1
  source = published_file(tmp_path / 'teacher.msgpack', ema, drift=False)
  result = run_cli(f'--source={source}', '--config=configs/demo.py', *SMALL_OVERRIDES,
                   f'--output={tmp_path / "out"}')
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith('Import error')]
  assert len(lines) == 1, result.stderr[-3000:]
  line = lines[0]
  for expected in ('2 missing: mid.block_2/norm1/bias (32,), mid.block_2/norm1/scale (32,)',
                   '1 unexpected: up_0.block_1/extra_dense/kernel (4, 4)',
                   '1 wrongly shaped: conv_in/kernel (3, 3, 3, 16) (expected (3, 3, 1, 16))'):
    assert expected in line, line
  assert not os.path.exists(tmp_path / 'out' / 'ema_params')


def test_class_conditional_import(tmp_path):
  """ImageNet-like teacher: class_emb, 'both' output (2 x channels)."""
  config = small_config(conditional=True)
  params = random_params(config, seed=3)
  assert params['class_emb']['kernel'].shape == (10, 32)
  assert params['conv_out']['kernel'].shape == (3, 3, 16, 2)
  source = published_file(tmp_path / 'imagenet_original', params)
  report = import_teacher.import_teacher(str(source), config, str(tmp_path / 'teacher'))
  assert report.num_params == sum(x.size for x in jax.tree.leaves(params))
  assert len(report.reshaped) == 2 and report.subtree == "'ema_params'"
  loaded = checkpoints.load_params(str(tmp_path / 'teacher'), import_teacher.abstract_params(config))
  np.testing.assert_array_equal(network_outputs(config, loaded), network_outputs(config, params))

  # The unconditional configuration does not take this file: class_emb is unexpected, and so on.
  with pytest.raises(ConfigError, match=r'unexpected: class_emb/bias \(32,\)'):
    import_teacher.import_teacher(str(source), small_config(), str(tmp_path / 'other'))


def test_gs_source_without_access_is_a_clean_message(tmp_path, monkeypatch):
  from etils import epath

  class NoAccess:
    def __init__(self, path):
      self.path = path

    def read_bytes(self):
      raise ImportError('Please install gcsfs to access Google Storage')

  monkeypatch.setattr(epath, 'Path', NoAccess)
  with pytest.raises(ConfigError) as info:
    import_teacher.import_teacher('gs://gresearch/diffusion-distillation/cifar_original',
                                  small_config(), str(tmp_path / 'out'))
  message = str(info.value)
  assert '\n' not in message
  assert "source='gs://gresearch/diffusion-distillation/cifar_original': cannot read it" in message
  assert 'gcsfs' in message and 'gsutil cp' in message


def test_gs_source_read_through_epath(tmp_path, monkeypatch):
  from etils import epath
  config = small_config()
  data = published_file(tmp_path / 'local', random_params(config)).read_bytes()
  seen = []

  class FakeGcs:
    def __init__(self, path):
      seen.append(str(path))

    def read_bytes(self):
      return data

  monkeypatch.setattr(epath, 'Path', FakeGcs)
  tree = import_teacher.parse_source(paths.read_bytes('gs://bucket/teacher', 'source'))
  assert seen == ['gs://bucket/teacher'] and 'ema_params' in tree


def test_other_file_layouts_and_bad_files(tmp_path):
  """Bare params, {'params': ...}, variables dicts and old optimizers; non-msgpack files."""
  ema = {'conv_in': {'kernel': np.ones((3, 3, 1, 4), np.float32)}}
  assert import_teacher.select_params(ema)[0] is ema
  assert import_teacher.select_params({'step': 1, 'params': {'params': ema}})[0] is ema
  assert import_teacher.select_params({'ema_params': {'params': ema}})[0] is ema
  assert import_teacher.select_params({'optimizer': {'target': ema, 'state': {}}})[0] is ema
  with pytest.raises(ConfigError, match="neither 'ema_params'"):
    import_teacher.select_params({'step': 1, 'rng': 2})

  # Nested module names map too; float64 is cast; integer leaves are refused.
  target = {'down_0.block_0': {'conv1': {'kernel': jax.ShapeDtypeStruct((2, 3), jnp.float32)}}}
  nested = {'down_0': {'block_0': {'conv1': {'kernel': np.ones((6,), np.float64)}}}}
  params, report = import_teacher.convert_params(nested, target)
  assert params['down_0.block_0']['conv1']['kernel'].shape == (2, 3)
  assert report.reshaped and report.cast
  with pytest.raises(ConfigError, match='dtype int32'):
    import_teacher.convert_params(
        {'down_0.block_0': {'conv1': {'kernel': np.ones((2, 3), np.int32)}}}, target)

  bad = tmp_path / 'not_msgpack'
  bad.write_bytes(b'\x00\x01 definitely not msgpack \xc1')
  with pytest.raises(ConfigError, match='not a Flax msgpack file'):
    import_teacher.parse_source(paths.read_bytes(str(bad), 'source'))
  with pytest.raises(ConfigError, match='no such file'):
    paths.read_bytes(str(tmp_path / 'missing'), 'source')


def test_image_shapes():
  config = small_config()
  for name, shape in (('cifar10', (32, 32, 3)), ('imagenet64', (64, 64, 3)), ('digits', (8, 8, 1))):
    config.data.name = name
    assert data.image_shape(config.data) == shape  # TFDS names from their dataset info
  config.data.name = 'mnist'
  with pytest.raises(ConfigError, match="data.name='mnist'"):
    data.image_shape(config.data)
