"""Sharded steps on 8 simulated CPU devices equal the 1-device steps, and state checkpoints restore
across meshes (slow tier: the session's 8-device subprocess, conftest `pod_run`); the mesh and FSDP
rules themselves (default tier)."""
import pytest

from tract_jax import parallel
from tract_jax.errors import ConfigError


@pytest.mark.slow
@pytest.mark.parametrize('method,mesh', [('teacher', 'fsdp2x4'), ('tract', 'dp8'),
                                         ('tract', 'fsdp2x4'), ('btd', 'fsdp2x4')])
def test_sharded_step_equals_single_device(pod_run, method, mesh):
  _, results, _ = pod_run
  assert results['num_devices'] == 8
  r = results['sharding'][f'{method}/{mesh}']
  assert abs(r['loss'] - r['loss_ref']) <= 1e-5 * max(1.0, abs(r['loss_ref']))
  assert r['max_param_diff'] < 1e-5
  if mesh == 'fsdp2x4':
    assert r['sharded_leaves'] > 0  # the FSDP rule really sharded parameters
  else:
    assert r['sharded_leaves'] == 0


@pytest.mark.slow
@pytest.mark.parametrize('direction', ['fsdp2x4->1dev', '1dev->fsdp2x4'])
def test_checkpoint_cross_restore(pod_run, direction):
  r = pod_run[1]['sharding'][f'restore/{direction}']
  assert r['equal'] and r['target_shardings']


def _fake_mesh(n):
  class M:
    shape = {'data': n, 'fsdp': 1}
  return M()


def test_mesh_validation_messages():
  with pytest.raises(ConfigError, match='mesh.fsdp=3'):
    parallel.make_mesh(-1, 3)
  with pytest.raises(ConfigError, match='data \\* fsdp must equal'):
    parallel.make_mesh(2, 1, [object()] * 3)
  with pytest.raises(ConfigError, match='batch_size=7'):
    parallel.check_batch(7, _fake_mesh(2))


def test_fsdp_rule():
  from jax.sharding import PartitionSpec as P
  assert parallel.leaf_spec((3, 3, 64, 128), 4, 1000) == P(None, None, None, 'fsdp')
  assert parallel.leaf_spec((3, 3, 6, 10), 4, 10) == P()
  assert parallel.leaf_spec((256,), 4, 1000) == P()  # small leaves stay replicated
  assert parallel.leaf_spec((1024, 1024), 1, 1) == P()
