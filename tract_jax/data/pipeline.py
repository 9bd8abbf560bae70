"""The training input: a grain.MapDataset over a source, shuffled per epoch, flipped at random,
batched, sliced for this process, decoded in worker processes and read ahead (see the package
docstring for why the batch of a step is a pure function of (seed, step))."""
import dataclasses
import os
import sys

import numpy as np

from tract_jax.data.sources import to_model_range
from tract_jax.data.tfds_source import hide_accelerators_from_tensorflow
from tract_jax.errors import ConfigError


def _pipeline_seeds(seed: int):
  """(shuffle seed, flip seed): independent 32-bit seeds derived from the config seed."""
  state = np.random.SeedSequence([int(seed) & (2**64 - 1), 0x6772_6169]).generate_state(2)
  return int(state[0]), int(state[1])


def _flip(example, rng: np.random.Generator):
  if rng.integers(2):
    example = dict(example, image=example['image'][:, ::-1])
  return example


def _check_layout(global_batch: int, process_index: int, process_count: int) -> int:
  if global_batch < 1:
    raise ConfigError(f'batch_size={global_batch}: must be positive')
  if global_batch % process_count:
    raise ConfigError(f'batch_size={global_batch}: must be divisible by the number of processes '
                      f'({process_count})')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index}: expected 0..{process_count - 1}')
  return global_batch // process_count


def step_dataset(source, global_batch: int, seed: int, *, process_index: int = 0,
                 process_count: int = 1, random_flip: bool = False):
  """A grain.MapDataset whose element `step` is this process's uint8 batch of that step.

  Element s = {'image': uint8 (B/P, H, W, C), 'label': int32 (B/P,)}: global positions
  s * B + p * B/P .. s * B + (p + 1) * B/P of the shuffled, repeated, flipped example sequence.
  Random access, no threads: `make_pipeline` iterates it; tests and tools can index it directly.
  """
  import grain
  local_batch = _check_layout(global_batch, process_index, process_count)
  shuffle_seed, flip_seed = _pipeline_seeds(seed)
  examples = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  if random_flip:
    examples = examples.random_map(_flip, seed=flip_seed)
  # Local batch k covers positions k * B/P .. (k + 1) * B/P: step s of process p is k = s * P + p.
  return examples.batch(local_batch)[process_index::process_count]


def batch_at(source, global_batch: int, seed: int, step: int, **layout) -> dict:
  """The model-ready batch that make_pipeline yields at `step` (same keyword arguments for the
  process layout and flips), read directly."""
  batch = step_dataset(source, global_batch, seed, **layout)[step]
  return _ToModelRange(getattr(source, 'max_level', 255.0))(batch)


@dataclasses.dataclass(frozen=True)
class _ToModelRange:
  max_level: float

  def __call__(self, batch):
    # Copies: the worker's arrays live in shared memory, released once nothing refers to them.
    return {'image': to_model_range(batch['image'], self.max_level),
            'label': np.array(batch['label'], np.int32)}


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Runs first in each spawned worker: decoding needs no accelerator, so keep JAX (which grain
  imports) and TensorFlow (if anything imports it) on the CPU."""
  del worker_index, worker_count
  os.environ['JAX_PLATFORMS'] = 'cpu'
  jax = sys.modules.get('jax')
  if jax is not None:
    jax.config.update('jax_platforms', 'cpu')
  hide_accelerators_from_tensorflow()


def _let_grain_read_its_flags() -> None:
  """grain 0.2.18 reads its absl flag --grain_enable_multiprocess_worker_profiling when it starts
  worker processes (once JAX is imported), which fails when absl has not parsed a command line
  (pytest, notebooks, scripts without absl.app). Mark only grain's own flags as given, with their
  defaults, in that case; a later absl parse still sets them."""
  from absl import flags
  if flags.FLAGS.is_parsed():
    return
  for flag_name in list(flags.FLAGS):
    if flag_name.startswith('grain_') and not flags.FLAGS[flag_name].present:
      flags.FLAGS[flag_name].present = 1


class Pipeline:
  """Iterator over (step, host-local batch) for step = start_step, start_step + 1, ...

  Batches are {'image': float32 (B/P, H, W, C) in [-1, 1], 'label': int32 (B/P,)}. Reading starts
  when the pipeline is made (workers warm up while the model compiles). An error raised while
  reading (in a worker too) is raised again by `next` with its type. Close it (or use it in a
  `with` block) to stop the threads and worker processes. `dataset` is the grain IterDataset.
  """

  def __init__(self, dataset, start_step: int):
    self.dataset = dataset
    self._step = int(start_step)
    self._closed = False
    self._iterator = iter(dataset)
    start = getattr(self._iterator, 'start_prefetch', None)
    if start is not None:
      start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed:
      raise RuntimeError('the input pipeline is closed')
    try:
      batch = next(self._iterator)
    except BaseException:
      self.close()
      raise
    step, self._step = self._step, self._step + 1
    return step, batch

  next = __next__  # the Prefetcher spelling

  def close(self):
    if not self._closed:
      self._closed = True
      self._iterator.close()
      self._iterator = None  # collected now, not during interpreter shutdown

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_pipeline(source, global_batch: int, seed: int, start_step: int, *,
                  process_index: int = 0, process_count: int = 1, random_flip: bool = False,
                  workers: int = 0, prefetch: int = 2) -> Pipeline:
  """The training input of this process from step `start_step` on (see the module docstring).

  Args:
    source: a random-access source (len, __getitem__ -> uint8 example, optional max_level).
    global_batch: examples per step over all processes (divisible by process_count).
    seed: the data seed; the global batch of a step is a function of (seed, step) only.
    start_step: the first step yielded; resuming at k yields what an uninterrupted run yields at k.
    process_index, process_count: this process reads rows p * B/P .. (p + 1) * B/P of each batch.
    random_flip: flip each example horizontally with probability 1/2, seeded by (seed, position).
    workers: worker processes building batches (grain mp_prefetch, spawned); 0 = in this process,
      on `prefetch` reader threads.
    prefetch: batches read ahead, per worker and on the parent's conversion thread; 0 = read on
      demand.

  Returns a Pipeline: `with make_pipeline(...) as batches: step, batch = next(batches)`.
  """
  import grain
  if workers < 0 or prefetch < 0:
    raise ConfigError(f'data.workers={workers}, data.prefetch={prefetch}: must be >= 0')
  steps = step_dataset(source, global_batch, seed, process_index=process_index,
                       process_count=process_count, random_flip=random_flip)[int(start_step):]
  if workers:
    _let_grain_read_its_flags()
    batches = steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)),
        worker_init_fn=_worker_init)
  else:
    batches = steps.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                      prefetch_buffer_size=prefetch))
  batches = batches.map(_ToModelRange(getattr(source, 'max_level', 255.0)))
  if prefetch:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  return Pipeline(batches, start_step)

