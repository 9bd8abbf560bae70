"""The mesh and FSDP rules (the sharded jobs on 8 simulated devices against the same jobs on this
process's devices, and restores across meshes: the slow tier's test_multidevice.py)."""
import pytest

from tract_jax import parallel
from tract_jax.errors import ConfigError


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
