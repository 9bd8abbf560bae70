"""The FID Inception-v3 network in Flax Linen (NHWC), and a jitted, optionally sharded feature function.

This is the TF graph 'inception-2015-12-05' as ported to PyTorch by pytorch-fid (weight file
pt_inception-2015-12-05-6726825d.pth; convert it with
`python -m tract_jax.evaluation.convert_inception`).
It differs from torchvision's Inception-v3 where the TF graph does:
  - the average pools of the Mixed_5x / Mixed_6x / Mixed_7b blocks exclude the zero padding from the
    count (count_include_pad=False): `FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE` (pool='avg');
  - Mixed_7c pools its last branch with a 3x3 MAX pool (`FIDInceptionE`, pool='max');
  - the classifier has 1008 outputs.
Every convolution has no bias and is followed by BatchNorm (inference form, eps 1e-3) and a ReLU.
Module names follow the PyTorch state_dict ('Mixed_5b/branch1x1/conv/kernel', '.../bn/scale', ...).

Features are the 2048-d global average pool ('pool3'). The input pipeline is the paper's code's
(apple/ml-tract lib/eval/fid.py and inception_net.py, which is pytorch-fid's network with
resize_input=True, normalize_input=False):
  1. images in [-1, 1] are snapped to uint8 levels: round(127.5 (x + 1)), clamped to 0..255, / 127.5 - 1;
  2. resized to 299x299 bilinearly with resize='torch' (the default): PyTorch's
     F.interpolate(mode='bilinear', align_corners=False), half-pixel centres, source index
     (dst + 0.5) * in / out - 0.5 clamped at 0, no antialiasing; this is what the paper's code and
     pytorch-fid do;
  3. fed to the network as they are, in [-1, 1].
resize='tf1' is the original TF graph's resize (tf.image.resize_bilinear, align_corners=False, NO
half-pixel centres: source index dst * in / out). It is NOT the paper's protocol: on 32x32 images it
changes pool3 features by about 20% (relative, real weights) and FID accordingly; it is kept to
compare with numbers from TF-based FID code.
"""
import functools
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tract_jax import parallel, paths
from tract_jax.evaluation.preprocess import DEFAULT_RESIZE, INPUT_SIZE, check_resize, preprocess
MIN_INPUT_SIZE = 75  # smallest input for which every VALID convolution and pool has an output
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3

Padding = Union[str, Sequence[Tuple[int, int]]]



# ---------------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------------
class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU; submodules 'conv', 'bn'."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Padding = 'VALID'
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding,
                use_bias=False, precision=self.precision, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def _same(kh: int, kw: int):
  """Explicit 'same' padding of a stride-1 odd kernel, as the PyTorch port writes it."""
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _avg_pool_3x3_same(x):
  # TF's AvgPool with SAME padding averages over the valid pixels only (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, padding: Padding = 'VALID'):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(valid count)-1x1 -> 224 + pool_features ch."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, (1, 1), name='branch1x1')(x)
    b5 = conv(48, (1, 1), name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=_same(5, 5), name='branch5x5_2')(b5)
    b3 = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=_same(3, 3), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=_same(3, 3), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 768 ch."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name='branch3x3')(x)
    bd = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=_same(3, 3), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b-e: 1x1 | factorised 7x7 | double factorised 7x7 | avgpool(valid count)-1x1 -> 768 ch."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name='branch1x1')(x)
    b7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=_same(1, 7), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=_same(7, 1), name='branch7x7_3')(b7)
    bd = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=_same(7, 1), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=_same(1, 7), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=_same(7, 1), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=_same(1, 7), name='branch7x7dbl_5')(bd)
    bp = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 1280 ch."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, (1, 1), name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name='branch3x3_2')(b3)
    b7 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=_same(1, 7), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=_same(7, 1), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool='avg', valid count) and Mixed_7c (pool='max', the TF graph's quirk) -> 2048 ch."""
  pool: str = 'avg'
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(320, (1, 1), name='branch1x1')(x)
    b3 = conv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=_same(1, 3), name='branch3x3_2a')(b3),
                          conv(384, (3, 1), padding=_same(3, 1), name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=_same(3, 3), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=_same(1, 3), name='branch3x3dbl_3a')(bd),
                          conv(384, (3, 1), padding=_same(3, 1), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == 'max':
      pooled = _max_pool_3x3(x, 1, padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"pool={self.pool!r}: allowed values are 'avg', 'max'")
    bp = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3 (pytorch-fid's `fid_inception_v3`, without auxiliary logits).

  Attributes:
    precision: matmul/conv precision (default HIGHEST: FID features should not depend on TF32/bf16
      passes of the accelerator).
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    """Runs the network.

    Args:
      x: (B, S, S, 3) preprocessed input in [-1, 1] (S = 299 for FID; any S >= 75 runs).

    Returns:
      {'pool': (B, 2048) pool3 features, 'logits': (B, 1008)}. Under jit, unused outputs cost nothing.
    """
    p = self.precision
    x = BasicConv(32, (3, 3), strides=(2, 2), precision=p, name='Conv2d_1a_3x3')(x)  # 149
    x = BasicConv(32, (3, 3), precision=p, name='Conv2d_2a_3x3')(x)                    # 147
    x = BasicConv(64, (3, 3), padding=_same(3, 3), precision=p, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2)                                                             # 73
    x = BasicConv(80, (1, 1), precision=p, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), precision=p, name='Conv2d_4a_3x3')(x)                   # 71
    x = _max_pool_3x3(x, 2)                                                             # 35
    x = FIDInceptionA(32, precision=p, name='Mixed_5b')(x)                              # 256 ch
    x = FIDInceptionA(64, precision=p, name='Mixed_5c')(x)                              # 288 ch
    x = FIDInceptionA(64, precision=p, name='Mixed_5d')(x)
    x = InceptionB(precision=p, name='Mixed_6a')(x)                                     # 17, 768 ch
    x = FIDInceptionC(128, precision=p, name='Mixed_6b')(x)
    x = FIDInceptionC(160, precision=p, name='Mixed_6c')(x)
    x = FIDInceptionC(160, precision=p, name='Mixed_6d')(x)
    x = FIDInceptionC(192, precision=p, name='Mixed_6e')(x)
    x = InceptionD(precision=p, name='Mixed_7a')(x)                                     # 8, 1280 ch
    x = FIDInceptionE('avg', precision=p, name='Mixed_7b')(x)                           # 2048 ch
    x = FIDInceptionE('max', precision=p, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=p, name='fc')(pool)
    return {'pool': pool, 'logits': logits}


def variable_shapes(size: int = INPUT_SIZE):
  """The variables tree {'params': ..., 'batch_stats': ...} as ShapeDtypeStructs (nothing computed)."""
  model = FIDInceptionV3()
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))


# ---------------------------------------------------------------------------------------------------
# Weight files: .npz of flattened 'params/Mixed_5b/branch1x1/conv/kernel' keys.
# ---------------------------------------------------------------------------------------------------
def flatten_tree(tree) -> dict:
  """Nested dict -> {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(dict(tree), sep='/')


def unflatten_tree(flat: dict) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def check_variables(variables, size: int = INPUT_SIZE) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped leaf of an Inception tree."""
  expected = {k: tuple(v.shape) for k, v in flatten_tree(variable_shapes(size)).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten_tree(variables).items()}
  problems = [f'missing {k} {s}' for k, s in expected.items() if k not in got]
  problems += [f'unexpected {k} {s}' for k, s in got.items() if k not in expected]
  problems += [f'{k}: shape {got[k]}, expected {s}' for k, s in expected.items()
               if k in got and got[k] != s]
  if problems:
    shown = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise ValueError(f'Inception weights do not match the network:\n  {shown}{more}')


def load_variables(path: str) -> dict:
  """Reads a converted weight file into {'params': ..., 'batch_stats': ...} of float32 numpy arrays."""
  with paths.load_npz(path) as f:  # local or gs://
    flat = {k: np.asarray(f[k], np.float32) for k in f.files}
  variables = unflatten_tree(flat)
  check_variables(variables)
  return variables


def save_variables(path: str, variables) -> None:
  """Writes a variables tree as an .npz of flattened 'a/b/c' keys (float32)."""
  np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flatten_tree(variables).items()})


# ---------------------------------------------------------------------------------------------------
# The feature function.
# ---------------------------------------------------------------------------------------------------
class InceptionFeatures:
  """Callable: images in [-1, 1] -> (N, 2048) pool3 features, in jitted batches.

  Args:
    variables: {'params': ..., 'batch_stats': ...} (see `load_variables`).
    mesh: optional `jax.sharding.Mesh`; each batch is split over all its axes along the leading
      (batch) dimension (NamedSharding(mesh, P(mesh.axis_names))), the weights are replicated.
      Default: one device.
    batch_size: global batch of one jitted call; the last batch is zero-padded, so only one shape is
      compiled. With a mesh it must be divisible by the mesh size (and by the process count).
    size: network input side; 299 is the FID protocol, smaller (>= 75) is only for fast tests.
    quantize: snap inputs to uint8 levels first (spec section 8).
    resize: 'torch' (default: PyTorch's half-pixel bilinear, as the paper's code and pytorch-fid) or
      'tf1' (the TF graph's resize, not the paper's protocol). Reference statistics must be made with
      the same value (`stats_files.load_stats(path, resize=...)` checks it).
    precision: conv/matmul precision (default HIGHEST).

  The pipeline is two jitted functions: the preprocessing (quantise, resize; compiled once per input
  resolution, in well under a second) and the network on (batch_size, size, size, 3) inputs (compiled
  once, whatever the resolution of the images).

  In a multi-process run each process passes its own images (the same count on every process) and
  gets its own rows back.
  """

  def __init__(self, variables, mesh: Optional[Mesh] = None, batch_size: int = 200,
               size: int = INPUT_SIZE, quantize: bool = True, resize: str = DEFAULT_RESIZE,
               precision=jax.lax.Precision.HIGHEST):
    if size < MIN_INPUT_SIZE:
      raise ValueError(f'size={size}: the network needs inputs of at least {MIN_INPUT_SIZE} pixels')
    self.mesh = mesh
    self.size = size
    self.batch_size = batch_size
    self.resize = check_resize(resize)
    self.quantize = quantize
    model = FIDInceptionV3(precision=precision)

    def prepare(images):
      return preprocess(images, size, quantize, resize)

    def network(variables, inputs):
      return model.apply(variables, inputs)['pool']

    if mesh is None:
      self.batch_sharding = None
      self.local_batch = batch_size
      self._variables = jax.device_put(variables)
      self._prepare = jax.jit(prepare)
      self._network = jax.jit(network)
    else:
      shards = mesh.size
      if batch_size % shards or batch_size % jax.process_count():
        raise ValueError(f'batch_size={batch_size}: must be divisible by the {shards} devices of the '
                         f'mesh and the {jax.process_count()} processes')
      self.batch_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
      replicated = NamedSharding(mesh, P())
      self.local_batch = batch_size // jax.process_count()
      self._variables = jax.device_put(variables, replicated)
      self._prepare = jax.jit(prepare, in_shardings=self.batch_sharding,
                              out_shardings=self.batch_sharding)
      self._network = jax.jit(network, in_shardings=(replicated, self.batch_sharding),
                              out_shardings=self.batch_sharding)

  def network_inputs(self, images) -> np.ndarray:
    """The preprocessed (N, size, size, 3) network inputs of (N, H, W, C) images (for tests and
    debugging; single-process, no padding logic needed)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    return np.asarray(preprocess(images, self.size, self.quantize, self.resize))

  def _run(self, chunk: np.ndarray):
    if self.batch_sharding is not None:
      chunk = jax.make_array_from_process_local_data(self.batch_sharding, chunk)
    return self._network(self._variables, self._prepare(chunk))

  def __call__(self, images) -> np.ndarray:
    """Features of a set of images.

    Args:
      images: (N, H, W, C) in [-1, 1], C in {1, 3}, H and W anything (resized to `size` with the
        `resize` convention).

    Returns:
      (N, 2048) float32 numpy array.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)  # here rather than in jit: one compiled shape for both
    n = len(images)
    if n == 0:
      return np.zeros((0, FEATURE_DIM), np.float32)
    out = []
    for start in range(0, n, self.local_batch):
      chunk = images[start:start + self.local_batch]
      pad = self.local_batch - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + images.shape[1:], np.float32)])
      rows, _ = parallel.local_rows(self._run(chunk))  # this process's rows of the batch
      out.append(rows[:self.local_batch - pad])
    return np.concatenate(out)[:n]

  def stats(self, batches):
    """Accumulates features of an iterable of (B, H, W, C) image batches into an `ActivationStats`."""
    from tract_jax.evaluation.fid import ActivationStats
    acc = ActivationStats(FEATURE_DIM)
    for batch in batches:
      acc.update(self(batch))
    return acc


def load_inception(path: str, mesh: Optional[Mesh] = None, resize: str = DEFAULT_RESIZE,
                   **kwargs) -> InceptionFeatures:
  """`InceptionFeatures` from a converted weight file (see convert_inception.py).

  Args:
    path: .npz written by `python -m tract_jax.evaluation.convert_inception`.
    mesh: optional mesh to shard batches over.
    resize: 'torch' (default, the paper's code) or 'tf1'; see `InceptionFeatures`.
    **kwargs: passed to `InceptionFeatures` (batch_size, size, quantize, precision).
  """
  return InceptionFeatures(load_variables(path), mesh=mesh, resize=resize, **kwargs)
