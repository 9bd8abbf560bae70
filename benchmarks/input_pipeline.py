"""Throughput of the input pipeline alone (tract_jax.data.make_pipeline, no model, no device).

  python benchmarks/input_pipeline.py [--steps=20] [--records=2048] [--batch=256] \
      [--workers=0,1,2] [--prefetch=2] [--process_count=1] [--json=out.json]

Datasets:
  - digits: the embedded 8x8 digits (in memory, no decoding): the pipeline's own overhead;
  - cifar10 and imagenet64: --records synthetic images written to a temporary TFDS data_dir as
    PNG-encoded tf.train.Example records in array_record files, laid out as
    download_and_prepare(file_format='array_record') lays out cifar10 (32x32) and
    imagenet_resized/64x64 (no TensorFlow needed). The images are smooth (bicubic up-sampled 8x8
    noise plus a little pixel noise), so their PNGs (the 'record' column) are photo-like in size
    rather than incompressible noise: decoding time grows with the compressed size. They are read
    and decoded exactly as in training.
For each dataset and worker count: the time from make_pipeline to the first batch of every worker
(worker start-up included), then images/s over --steps further batches of --batch images (random
flips on, as in training). `--process_count=P` measures one host's share (process 0 reads batch/P
per step), which is what each of P hosts must deliver. The last column divides by 2,000 images/s,
the per-GPU rate the CIFAR-10 paper config is budgeted to consume (for scale: its TRACT step
measured 1,152 images/s in float32 on one H200), i.e. how many such GPUs one host's pipeline keeps
fed. The 'direct' row reads the source item by item in this thread (source[i] for every example:
record read + PNG decode), without grain: the single-core decode rate.

Numbers from a shared machine are noisy; compare rows of the same run.
"""
import io
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

GPU_IMAGES_PER_S = 2000  # one GPU in the CIFAR-10 paper config


def synthetic_images(count: int, side: int, seed: int = 0) -> np.ndarray:
  """uint8 (count, side, side, 3): smooth colour fields plus mild noise (photo-like PNG sizes)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  out = np.empty((count, side, side, 3), np.uint8)
  for i in range(count):
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), np.float32)
    out[i] = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
  return out


def write_tfds_split(data_dir: str, tfds_name: str, images: np.ndarray, labels) -> int:
  """A prepared TFDS train split in array_record files (PNG records + dataset_info.json), written
  without TensorFlow. Returns the mean record size in bytes."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from PIL import Image
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

  builder = tfds.builder(tfds_name, data_dir=data_dir, file_format='array_record')
  folder = os.fspath(builder.data_path)
  os.makedirs(folder, exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(folder, f'{builder.name}-train.array_record-00000-of-00001'), 'group_size:1')
  total = 0
  for i, (image, label) in enumerate(zip(images, labels)):
    png = io.BytesIO()
    Image.fromarray(image).save(png, format='PNG')
    features = {
        'image': tf_feature_pb2.Feature(
            bytes_list=tf_feature_pb2.BytesList(value=[png.getvalue()])),
        'label': tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[int(label)]))}
    if 'id' in builder.info.features:
      features['id'] = tf_feature_pb2.Feature(
          bytes_list=tf_feature_pb2.BytesList(value=[f'train_{i}'.encode()]))
    record = tf_example_pb2.Example(
        features=tf_feature_pb2.Features(feature=features)).SerializeToString()
    total += len(record)
    writer.write(record)
  writer.close()
  template = tfds.core.ShardedFileTemplate(data_dir=folder, dataset_name=builder.name,
                                           split='train', filetype_suffix='array_record')
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=[len(images)], num_bytes=total, filename_template=template)]))
  builder.info.write_to_directory(folder)
  return total // max(len(images), 1)


def measure(source, args, workers: int) -> dict:
  from tract_jax import data
  local_batch = args.batch // args.process_count
  start = time.perf_counter()
  with data.make_pipeline(source, args.batch, seed=0, start_step=0, process_index=0,
                          process_count=args.process_count, random_flip=True, workers=workers,
                          prefetch=args.prefetch) as batches:
    for _ in range(max(workers, 1)):  # one batch from each worker: all of them have started
      next(batches)
    first = time.perf_counter()
    for _ in range(args.steps):
      _, batch = next(batches)
    end = time.perf_counter()
  assert batch['image'].shape[0] == local_batch and batch['image'].dtype == np.float32
  rate = args.steps * local_batch / (end - first)
  return {'workers': workers, 'startup_s': first - start, 'images_per_s': rate,
          'steps_per_s': args.steps / (end - first)}


def measure_direct(source, args) -> dict:
  count = min(len(source), max(args.batch, 256))
  start = time.perf_counter()
  for i in range(count):
    source[i]
  seconds = time.perf_counter() - start
  return {'workers': 'direct', 'startup_s': 0.0, 'images_per_s': count / seconds,
          'steps_per_s': count / seconds / (args.batch // args.process_count)}


def _define_flags():
  """Flags are defined only when run as a program (tests import this module's writer)."""
  from absl import flags
  flags.DEFINE_integer('steps', 20, 'Timed batches after the first.')
  flags.DEFINE_integer('records', 2048, 'Synthetic records per dataset.')
  flags.DEFINE_integer('batch', 256, 'Global batch.')
  flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker counts.')
  flags.DEFINE_integer('prefetch', 2, 'Batches read ahead.')
  flags.DEFINE_integer('process_count', 1, 'Measure one host of this many (it reads '
                       'batch/process_count per step).')
  flags.DEFINE_list('datasets', ['digits', 'cifar10', 'imagenet64'], 'Datasets to read.')
  flags.DEFINE_string('json', '', 'Also write the rows here.')


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  worker_counts = [int(w) for w in args.workers if w.strip()]

  from tract_jax import data
  import ml_collections

  rows = []
  with tempfile.TemporaryDirectory(prefix='tract_jax_input_bench_') as data_dir:
    for name in args.datasets:
      record_bytes = None
      if name == 'digits':
        source = data.load_digits()
      else:
        side = {'cifar10': 32, 'imagenet64': 64}[name]
        labels = np.arange(args.records) % {'cifar10': 10, 'imagenet64': 1000}[name]
        record_bytes = write_tfds_split(data_dir, data.TFDS_NAMES[name],
                                        synthetic_images(args.records, side), labels)
        source = data.load_source(ml_collections.ConfigDict({'name': name, 'data_dir': data_dir}))
      results = [measure_direct(source, args)] + [measure(source, args, w) for w in worker_counts]
      for result in results:
        shape = 'x'.join(map(str, source.image_shape))
        rows.append(dict(dataset=name, image=shape, record_bytes=record_bytes, **result))

  batch = args.batch // args.process_count
  host = (f'this host of {args.process_count}, ' if args.process_count > 1 else '')
  print(f'Input pipeline alone: {host}batch {batch} per step, random flips, prefetch '
        f'{args.prefetch}, {args.steps} timed steps, {os.cpu_count()} CPUs '
        f'({platform.processor() or platform.machine()})')
  header = (f'{"dataset":<11} {"image":<8} {"record":>7} {"workers":>7} {"start s":>8} '
            f'{"images/s":>9} {"steps/s":>8} {"GPUs fed":>9}')
  print(header)
  print('-' * len(header))
  for r in rows:
    record = f'{r["record_bytes"] / 1024:.1f}K' if r['record_bytes'] else 'memory'
    print(f'{r["dataset"]:<11} {r["image"]:<8} {record:>7} {str(r["workers"]):>7} '
          f'{r["startup_s"]:>8.2f} {r["images_per_s"]:>9,.0f} {r["steps_per_s"]:>8.2f} '
          f'{r["images_per_s"] / GPU_IMAGES_PER_S:>9.2f}')
  print(f'GPUs fed = images/s / {GPU_IMAGES_PER_S:,} (one GPU in the CIFAR-10 paper config); '
        '"direct" = source[i] in one thread, no grain.')
  if args.json:
    with open(args.json, 'w') as f:
      options = {k: args[k].value for k in ('steps', 'records', 'batch', 'workers', 'prefetch',
                                            'process_count', 'datasets')}
      json.dump({'args': options, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
