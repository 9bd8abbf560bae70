"""Sampling and scoring during and after training: fixed-noise grids, teacher agreement, the offline
digits FID and the Inception FID. One Evaluator is built per job, so its jitted sampler compiles once.
"""
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tract_jax import methods, parallel, paths, seeds, writers
from tract_jax.evaluation.digits_metric import teacher_agreement_rmse

# Generated features KID compares with the reference features (KID uses subsets of 1,000).
KID_FEATURES = 10_000


class Evaluator:
  """Samples from fixed noise (and labels) shared by the teacher and every student, so grids and
  agreement line up; scores them with config.eval.metrics."""

  def __init__(self, config, model, image_shape, workdir: str, mesh):
    """model: the network (factory.build_model(config.model)); the config's method record says how
    it is sampled (DDIM, or EDM's section-2 sampler on the teacher_steps grid). The teacher's
    T-step samples are the reference, the S-step samples the students' (and the undistilled
    teacher's)."""
    self.workdir = paths.resolve(workdir)  # local or gs://
    self.mesh = mesh
    self.sample = methods.for_config(config).parametrisation.make_sampler(model, config)
    n = config.eval.num_samples
    key = jax.random.PRNGKey(config.seed + seeds.EVAL_NOISE)
    # Generated identically on every host (same key), then each sampling batch is split over devices.
    self.noise = np.asarray(jax.random.normal(key, (n,) + tuple(image_shape), jnp.float32))
    if config.model.num_classes:  # uniformly random labels for evaluation samples
      self.labels = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (n,), 0,
                                                  config.model.num_classes))
    else:
      self.labels = None
    self.batch = config.eval.sample_batch
    self.metrics = tuple(config.eval.metrics)
    self.seed = config.seed
    self.num_classes = config.model.num_classes
    self.fid_samples = config.eval.fid_samples
    self.inception_weights = config.eval.inception_weights
    self.reference_stats = config.eval.reference_stats
    self.fid_resize = config.eval.fid_resize
    self.inception_batch = config.eval.inception_batch
    self.kid_subsets = config.eval.kid_subsets
    self.kid_subset_size = config.eval.kid_subset_size
    self.reference: Optional[np.ndarray] = None  # the teacher's T-step samples, once computed
    self._digits = None
    self._inception = None
    self._reference_stats = None
    self._reference_root = None

  def _save_grid(self, name: str, images) -> None:
    """workdir/name: a PNG grid of samples of the fixed noise (labelled when class-conditional)."""
    print(f'  wrote {writers.save_grid(self.workdir / name, images, labels=self.labels)}', flush=True)

  def _sample_batch(self, params, noise, labels, num_steps: int) -> np.ndarray:
    sharding = parallel.batch_sharding(self.mesh)
    labels = None if labels is None else jax.device_put(labels, sharding)
    return parallel.to_host(self.sample(params, jax.device_put(noise, sharding), num_steps, labels))

  def samples(self, params, num_steps: int) -> np.ndarray:
    """(num_samples, H, W, C) images in [-1, 1] from the fixed noise."""
    out = []
    for i in range(0, len(self.noise), self.batch):
      labels = None if self.labels is None else self.labels[i:i + self.batch]
      out.append(self._sample_batch(params, self.noise[i:i + self.batch], labels, num_steps))
    return np.concatenate(out)

  def score(self, params, num_steps: int, reference=None) -> Tuple[Dict[str, float], np.ndarray]:
    """(scores, images): the configured metrics of `num_steps`-step samples.

    'agreement': RMSE against the teacher's T-step samples from the same noise (`reference`, by
    default the teacher reference computed by this evaluator); 'digits_fid': FID in the embedded
    digits' feature space (offline); 'fid': Inception FID against the reference statistics, on
    eval.fid_samples samples. Samples are quantised to uint8 levels first, like the paper's code.
    """
    reference = self.reference if reference is None else reference
    images = self.samples(params, num_steps)
    out = {}
    if 'agreement' in self.metrics and reference is not None:
      out['rmse_vs_teacher'] = teacher_agreement_rmse(images, reference)
    if 'digits_fid' in self.metrics:
      out['digits_fid'] = self.digits_fid(images)
    if 'fid' in self.metrics or 'kid' in self.metrics:
      out.update(self.inception_scores(params, num_steps))
    return out, images

  def digits_fid(self, images) -> float:
    if self._digits is None:
      from tract_jax.evaluation.digits_metric import DigitsMetric
      self._digits = DigitsMetric()
    return self._digits.fid(images)

  def inception_scores(self, params, num_steps: int) -> Dict[str, float]:
    """FID (and KID) of eval.fid_samples fresh samples against the reference statistics, with the
    paper's protocol: uint8 quantisation, eval.fid_resize to 299x299, pool3 features.

    Each process scores only the samples its devices made (its rows of every sampling batch); the
    float64 statistics, and at most KID_FEATURES features for KID, are then combined over processes.
    """
    from tract_jax.evaluation import fid, inception, kid, stats_files
    if self._inception is None:
      self._inception = inception.load_inception(self.inception_weights, mesh=self.mesh,
                                                 resize=self.fid_resize,
                                                 batch_size=self.inception_batch)
      self._reference_stats = stats_files.read_stats(self.reference_stats)
      stats_files.check_stats_convention(self._reference_stats.meta, self.fid_resize,
                                         self.reference_stats)
      # The reference covariance's square root, once for every evaluation of the run.
      self._reference_root = (fid.psd_sqrt(self._reference_stats.sigma, 'the reference covariance')
                              if 'fid' in self.metrics else None)
    stats = fid.ActivationStats()
    kept, kept_index = [], []  # this process's first generated features (and sample numbers) for KID
    keep = -(-KID_FEATURES // jax.process_count()) if 'kid' in self.metrics else 0
    key = jax.random.PRNGKey(self.seed + seeds.FID_NOISE)
    sharding = parallel.batch_sharding(self.mesh)
    for i in range(0, self.fid_samples, self.batch):
      k = jax.random.fold_in(key, i)
      noise = np.asarray(jax.random.normal(k, (self.batch,) + self.noise.shape[1:], jnp.float32))
      labels = (jax.device_put(np.asarray(jax.random.randint(
          jax.random.fold_in(k, 1), (self.batch,), 0, self.num_classes)), sharding)
                if self.num_classes else None)
      images = self.sample(params, jax.device_put(noise, sharding), num_steps, labels)
      rows, index = parallel.local_rows(images)
      features = np.asarray(self._inception(rows))  # every process the same count: no early exit
      wanted = index < self.fid_samples - i  # the last batch may overshoot
      features, index = features[wanted], index[wanted] + i
      stats.update(features)
      if len(kept) < keep:
        kept.extend(features[:keep - len(kept)])
        kept_index.extend(index[:keep - len(kept_index)])
    if jax.process_count() > 1:
      merged = fid.ActivationStats()
      for flat in parallel.allgather_float64(stats.to_array()):
        merged.merge(fid.ActivationStats.from_array(flat))
      stats = merged
    mu, sigma, _ = stats.finalize()
    reference = self._reference_stats
    out = {}
    if 'fid' in self.metrics:
      out[f'fid{self.fid_samples // 1000}k'] = fid.frechet_distance(
          mu, sigma, reference.mu, reference.sigma, self._reference_root)
    if keep:
      generated = np.asarray(kept, np.float32).reshape(-1, stats.dim)
      order = np.asarray(kept_index, np.int32)
      if jax.process_count() > 1:  # the same count from every process
        from jax.experimental import multihost_utils
        counts = multihost_utils.process_allgather(np.asarray([len(generated)], np.int32))
        n = int(np.min(counts))
        generated = np.asarray(multihost_utils.process_allgather(generated[:n], tiled=True))
        order = np.asarray(multihost_utils.process_allgather(order[:n], tiled=True))
      generated = generated[np.argsort(order, kind='stable')]  # sample order, however many hosts
      out['kid'], out['kid_std'] = kid.kid(generated, reference.features, self.kid_subsets,
                                           self.kid_subset_size, seed=self.seed)
    return out

  def teacher_reference(self, teacher_params, teacher_steps: int) -> np.ndarray:
    """T-step teacher samples from the fixed noise, cached in the workdir (with their grid)."""
    path = self.workdir / f'teacher_samples_{teacher_steps}.npz'
    # Sampling is collective: use the cache only if every process sees it.
    if not parallel.any_process(not path.exists()):
      cached = paths.load_npz(path)['images']
      if cached.shape == self.noise.shape:
        self.reference = cached
        return cached
    images = self.samples(teacher_params, teacher_steps)
    self.reference = images
    if jax.process_index() == 0:
      paths.save_npz(path, images=images)  # atomic: a crash never leaves a half-written cache
      self._save_grid(f'teacher_{teacher_steps}steps.png', images)
    return images

  def report(self, writer, step: int, params, num_steps: int, phase: int, phase_end: bool):
    """Scores a student, writes the scalars (TensorBoard, summary.jsonl) and its samples; at a
    phase end also the PNG grid phase<k>_student_<n>steps.png."""
    scores, images = self.score(params, num_steps)
    if jax.process_index() != 0:
      return scores
    extra = {'eval/phase': phase}
    if phase_end:
      extra.update({'eval/student_steps': num_steps, 'eval/phase_end': 1})
      self._save_grid(f'phase{phase}_student_{num_steps}steps.png', images)
    writer.scalars(step, {f'eval/{k}': v for k, v in scores.items()} | extra)
    writer.image(step, f'samples/phase{phase}_{num_steps}steps', images)
    what = f'phase {phase} student ({num_steps} steps)' if phase_end else f'eval at step {step}'
    print(f'  {what}: ' + ', '.join(f'{k} {v:.4f}' for k, v in scores.items()), flush=True)
    return scores

  def final_agreement(self, teacher_params, student_params, teacher_steps: int,
                      student_steps: int) -> Dict[str, float]:
    """RMSE of the final student's samples and of the undistilled teacher at the student's step
    count, both against the teacher's T-step samples from the same noise (plus digits FIDs)."""
    reference = self.teacher_reference(teacher_params, teacher_steps)
    undistilled = self.samples(teacher_params, student_steps)
    student = self.samples(student_params, student_steps)
    if jax.process_index() == 0:
      self._save_grid(f'teacher_{student_steps}steps.png', undistilled)
    result = {'student_steps': student_steps,
              'rmse_student_vs_teacher': teacher_agreement_rmse(student, reference),
              'rmse_undistilled_vs_teacher': teacher_agreement_rmse(undistilled, reference)}
    result['ratio'] = result['rmse_student_vs_teacher'] / max(
        result['rmse_undistilled_vs_teacher'], 1e-12)
    if 'digits_fid' in self.metrics:
      result['digits_fid_teacher'] = self.digits_fid(reference)
      result['digits_fid_student'] = self.digits_fid(student)
      result['digits_fid_undistilled'] = self.digits_fid(undistilled)
    return result
