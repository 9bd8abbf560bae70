"""Device mesh, shardings and the global batch (jax.jit + Mesh/NamedSharding; no pmap).

The mesh has two axes: 'data' (data parallelism) and 'fsdp' (parameters sharded over devices, for
models that do not fit replicated). The batch is split over both axes together, so every device holds
B / num_devices examples whatever the split; a parameter leaf is sharded over 'fsdp' along its
largest dimension that divides evenly, when it has at least `fsdp_min_size` elements. With
fsdp = 1 everything is replicated and XLA inserts the gradient all-reduce.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tract_jax.default_config import FSDP_MIN_SIZE
from tract_jax.errors import ConfigError

BATCH_AXES = ('data', 'fsdp')


def maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize() when the config or the environment says the job is multi-host.

  'auto' initialises when a coordinator is named in the environment (JAX_COORDINATOR_ADDRESS, as set
  by launch/*.sh) or when running on a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several
  hosts); 'always' and 'never' force it.
  """
  mode = config.distributed
  if mode not in ('auto', 'always', 'never'):
    raise ConfigError(f"distributed={mode!r}: allowed values are 'auto', 'always', 'never'")
  heartbeat = config.heartbeat_timeout_seconds
  if not isinstance(heartbeat, int) or heartbeat < 1:
    raise ConfigError(f'heartbeat_timeout_seconds={heartbeat!r}: must be a positive integer')
  if mode == 'never':
    return
  tpu_hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if mode == 'always' or os.environ.get('JAX_COORDINATOR_ADDRESS') or len(tpu_hosts) > 1:
    if not jax.distributed.is_initialized():
      # jax reads only the coordinator address from the environment; on GPU hosts the process
      # count and index come from JAX_NUM_PROCESSES / JAX_PROCESS_ID (set by launch/gpu.sh).
      kwargs = {}
      if os.environ.get('JAX_NUM_PROCESSES'):
        kwargs['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
      if os.environ.get('JAX_PROCESS_ID'):
        kwargs['process_id'] = int(os.environ['JAX_PROCESS_ID'])
      if os.environ.get('JAX_PLATFORMS', '').split(',')[0] == 'cpu':
        # CPU processes (tests, simulated pods) need a collectives library to talk to each other.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      # The coordination service stops every surviving process (abort, exit 134) when one has sent
      # no heartbeat for this long: a dead host ends the job instead of leaving the rest waiting in
      # a collective. Re-running every process then resumes from the last checkpoint.
      jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat, **kwargs)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on at least one (a barrier: every process must
  call it at the same point). One process: `flag` itself, no communication."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
  return bool(np.max(flags))


def max_over_processes(value: int) -> int:
  """The largest of every process's `value` (a barrier, like any_process)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray([int(value)], np.int32))))


def preemption_service():
  """JAX's preemption sync manager when this is a multi-process job that has one, else None.

  jax.distributed.initialize starts it (jax_enable_preemption_service, on by default); it catches
  SIGTERM itself and agrees on a step through the coordination service
  (multihost_utils.reached_preemption_sync_point), the mechanism Orbax's preemption saving uses.
  """
  if jax.process_count() == 1:
    return None
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.preemption_sync_manager


def reached_preemption_sync_point(counter: int) -> bool:
  """True on every process at the same `counter` once any process of the job got SIGTERM.

  `counter` must grow by one per call and be the same on every process at the same call."""
  from jax.experimental import multihost_utils
  return bool(multihost_utils.reached_preemption_sync_point(counter))


def use_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` (local or gs://; '' = off), so a
  restarted or resumed job loads its compiled steps instead of compiling them again. A cache that
  is already configured (JAX_COMPILATION_CACHE_DIR, or by the caller) takes precedence."""
  if not directory or jax.config.jax_compilation_cache_dir:
    return
  if '://' not in directory:
    directory = os.path.expanduser(directory)
  jax.config.update('jax_compilation_cache_dir', directory)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; data = -1 takes what fsdp leaves."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f'mesh.fsdp={fsdp}: must be a positive divisor of the {n} devices present')
  if data == -1:
    data = n // fsdp
  if data < 1 or data * fsdp != n:
    raise ConfigError(f'mesh.data={data}, mesh.fsdp={fsdp}: data * fsdp must equal the {n} devices '
                      'present (use mesh.data=-1 to fill)')
  return Mesh(np.asarray(devices).reshape(data, fsdp), ('data', 'fsdp'))


def mesh_from_config(config) -> Mesh:
  mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
  connect(mesh)
  return mesh


def connect(mesh: Mesh) -> None:
  """One small collective over all of the mesh's devices, run while the processes are in step.

  CPU processes (gloo) give the first collective over a set of devices 30 s for every process to
  join, and fail after that; once joined, a collective waits for a late process as long as it
  takes (measured, jax 0.10.2: a 45 s late process fails the first way, passes the second). And
  processes reach their first train step far apart: only process 0 writes JAX's compilation
  cache, and on CPU the cache keys differ between processes, so in any later run process 0 loads
  each step while the others compile it. No-op with one process.
  """
  if jax.process_count() == 1:
    return
  ones = np.ones(mesh.size, np.float32)
  x = jax.make_array_from_callback(ones.shape, batch_sharding(mesh), lambda index: ones[index])
  total = jax.jit(lambda v: v.sum(), out_shardings=replicated(mesh))(x)
  if float(total.addressable_data(0)) != mesh.size:
    raise RuntimeError(f'a sum of ones over the {mesh.size} devices gave {total}: the processes '
                       'do not reach each other')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def leaf_spec(shape, fsdp: int, min_size: int) -> P:
  """FSDP rule: shard the largest dimension divisible by fsdp, for leaves of at least min_size."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in order:
    if shape[d] % fsdp == 0:
      spec = [None] * len(shape)
      spec[d] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, fsdp_min_size: int = FSDP_MIN_SIZE):
  """NamedShardings for every leaf of a pytree of arrays or ShapeDtypeStructs."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp, fsdp_min_size)),
                      tree)


def check_batch(global_batch: int, mesh: Mesh, field: str = 'batch_size') -> None:
  shards = num_batch_shards(mesh)
  if global_batch % shards:
    raise ConfigError(f'{field}={global_batch}: must be divisible by the {shards} devices of the '
                      f'mesh (data={mesh.shape["data"]} x fsdp={mesh.shape["fsdp"]})')
  if global_batch % jax.process_count():
    raise ConfigError(f'{field}={global_batch}: must be divisible by the {jax.process_count()} '
                      'processes')


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy batch dict -> global jax.Arrays sharded over the batch axis.

  Each process passes the rows it read (its slice of the global batch, see data.make_pipeline).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as one numpy array on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def local_rows(x: jax.Array):
  """(rows, global row indices) of a batch-sharded array that this process holds, in order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    array = np.asarray(x)
    return array, np.arange(len(array))
  seen, rows, index = set(), [], []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = shard.index[0].start or 0
    if start in seen:  # a replica of rows already taken
      continue
    seen.add(start)
    data = np.asarray(shard.data)
    rows.append(data)
    index.append(np.arange(start, start + len(data)))
  return np.concatenate(rows), np.concatenate(index)


def allgather_float64(x) -> np.ndarray:
  """(num_processes, ...) float64 copies of every process's `x`, exact to about 48 bits.

  Device collectives carry float32 unless x64 is on, so each value travels as a float32 pair
  (hi, lo = x - hi) and is summed back on the host.
  """
  x = np.asarray(x, np.float64)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  hi = x.astype(np.float32)
  lo = (x - hi.astype(np.float64)).astype(np.float32)
  pair = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.float64)
  return pair[:, 0] + pair[:, 1]


def describe(mesh: Mesh) -> str:
  return (f'mesh data={mesh.shape["data"]} x fsdp={mesh.shape["fsdp"]} over {mesh.size} '
          f'{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)')
