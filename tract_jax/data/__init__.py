"""Input pipelines: grain datasets of host-local numpy batches, addressed by step number.

Sources (`load_source(config.data)`; data.name picks one, `check_name` validates it without I/O):
  'digits'        the 1,797 8x8 grey digits embedded in the package (offline demo data)
  'cifar10'       TFDS cifar10, train split
  'imagenet64'    TFDS imagenet_resized/64x64, train split
  'tfds:NAME'     any prepared TFDS dataset with an 'image' feature ('label', a ClassLabel, is
                  optional: without it every label is 0 and num_classes is 0); NAME may carry a
                  config and version, e.g. 'tfds:celeb_a' or 'tfds:lsun/church_outdoor:3.1.0'
  a directory     .png/.jpg/.jpeg files, either all directly in it (unlabelled, num_classes 0) or
                  in one sub-folder per class (labels 0, 1, ... in sorted sub-folder order)
  a .npz file     uint8 'images' (N, H, W) or (N, H, W, C) with C = 1 or 3, optional int 'labels'
                  (N,) (num_classes = max label + 1; without labels: 0)
`image_shape(config.data)` is the (H, W, C) a source would give, without the data for a TFDS name
(its registered builder declares it): what export, the benchmarks and the importers use.
`data.image_size` > 0 makes every image square: the shorter side is resized to image_size with
PIL's bicubic filter (antialiased when shrinking: PIL widens the kernel by the scale factor), then
the centre is cropped; 0 keeps the native size, which must then be the same for every example.

The TFDS datasets are read with `tfds.data_source` (random access over array_record files) and never
import TensorFlow; nothing here downloads: a dataset that is not prepared in `data.data_dir` is a
ConfigError that says how to prepare it elsewhere. Folders and .npz files are local paths.

Every source is a random-access sequence (`__len__`, `__getitem__(i)` -> {'image': uint8 (H, W, C),
'label': int32}, what grain's MapDataset.source reads) and also answers `get(indices)` with a
model-ready batch {'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}.

`make_pipeline` is the training input: a grain.MapDataset over the source, shuffled per epoch,
flipped at random, batched, sliced for this process, decoded in worker processes and read ahead.

Why the batch of a step is a pure function of (seed, step). The pipeline is index-addressed end to
end: global position i = step * B + row (B = global batch) holds the example that grain's per-epoch
index shuffle puts at offset i mod N of epoch i // N (N = dataset size; the shuffle seed of an
epoch is derived from `seed` and the epoch), and its flip is drawn from a generator seeded by
(flip seed, i). Process p of P reads rows p * B/P .. (p + 1) * B/P of each global batch, i.e. the
positions step * B + p * B/P + r. Nothing depends on how many batches were read before, on the
number of processes or on the number of workers, so:
  - a run resumed at step k (a new pipeline with start_step=k) reads exactly the batches an
    uninterrupted run reads at k, k + 1, ...; there is no iterator state to checkpoint;
  - 1-process and P-process runs train on the same global batches;
  - changing data.workers or data.prefetch changes speed, never the data.
This holds for one grain version (the shuffle is grain's index_shuffle; setup.py pins grain < 0.3).
Not tfds.split_for_jax_process: it gives each process a fixed share of the examples, so a step's
global batch would depend on the process count.

Worker processes (data.workers > 0) are started by grain with the 'spawn' method, never fork, so
they do not inherit the parent's JAX runtime threads or device handles; each worker re-imports the
main module (keep a script's work under `if __name__ == '__main__':`) and unpickles the pipeline,
and is told to keep JAX on the CPU. Each worker builds whole batches of uint8 images; the parent
converts them to float32 (4x less shared-memory traffic) on a read-ahead thread.
"""
import os

from tract_jax.data.names import (ALLOWED, DATASETS, TFDS_NAMES, TFDS_PREFIX, check_name,
                                  describe_allowed, kind)
from tract_jax.data.pipeline import Pipeline, batch_at, make_pipeline, step_dataset
from tract_jax.data.sources import (FIRST_BATCH_CHECKED, IMAGE_EXTENSIONS, ArraySource, FolderSource,
                                    check_labels, fit_square, load_digits, load_npz,
                                    to_model_range)
from tract_jax.data.tfds_source import TfdsSource, load_tfds, tfds_image_shape
from tract_jax.errors import ConfigError

__all__ = ['ALLOWED', 'DATASETS', 'TFDS_PREFIX', 'check_name', 'describe_allowed', 'load_source',
           'image_shape', 'Pipeline', 'batch_at', 'make_pipeline', 'step_dataset',
           'FIRST_BATCH_CHECKED', 'IMAGE_EXTENSIONS', 'ArraySource', 'FolderSource', 'check_labels',
           'fit_square', 'load_digits', 'load_npz', 'to_model_range', 'TFDS_NAMES', 'TfdsSource',
           'load_tfds']


def _image_size(data_config) -> int:
  image_size = int(data_config.get('image_size', 0) or 0)
  if image_size < 0:
    raise ConfigError(f'data.image_size={image_size}: expected 0 (native size) or a positive side')
  return image_size


def load_source(data_config):
  """The source data.name names (see the module docstring), images fitted to data.image_size."""
  name = data_config.name
  image_size = _image_size(data_config)
  form = kind(name)
  if form in ('npz', 'folder'):
    name = os.path.expanduser(name)
  if name == 'digits':
    return load_digits(image_size)
  if form in ('named', 'tfds'):
    return load_tfds(name, data_config.get('data_dir') or None, image_size)
  if form == 'npz':
    return load_npz(name, image_size)
  return FolderSource(name, image_size)


def image_shape(data_config) -> tuple:
  """(H, W, C) of the model's images for data.name, as load_source would give them: a TFDS dataset
  answers from its info (no data needed, see tfds_image_shape), the embedded digits, a folder or an
  .npz file from the source itself."""
  name = data_config.name
  if name != 'digits' and kind(name) in ('named', 'tfds'):
    return tfds_image_shape(name, data_config.get('data_dir') or None, _image_size(data_config))
  return tuple(load_source(data_config).image_shape)

