"""Defaults shared by every job. Job configs in configs/ import this and override a few fields.

Usage: python -m tract_jax.main --config=configs/<job>.py --workdir=DIR [--config.field=value ...]
"""
import importlib.util
import os

import ml_collections

# Parameter leaves with fewer elements stay replicated under FSDP (config.mesh.fsdp_min_size).
FSDP_MIN_SIZE = 2**18


def sibling(config_file: str, name: str):
  """Loads configs/<name>.py next to `config_file` as a module, so that a job config can start from
  another one (ml_collections loads config files by path, not as a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + '.py')
  spec = importlib.util.spec_from_file_location(f'tract_jax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  config = ml_collections.ConfigDict()
  config.method = 'tract'          # methods.names(): 'teacher', 'tract', 'btd', 'tract_edm' (EDM)
  # 'ddim': the variance-preserving cosine schedule of TRACT.md (methods teacher, tract, btd);
  # 'edm': EDM's sigma grid and preconditioning of docs/SPEC_EDM.md (methods teacher, tract_edm).
  config.parametrisation = 'ddim'
  config.mode = 'train'            # 'train', 'evaluate' (score saved params) or 'sample' (write samples)
  config.seed = 0

  # ---- distillation (spec sections 2-5) ------------------------------------------------------------
  config.teacher_checkpoint = ''   # an Orbax params checkpoint; '' = train one first (teacher_training)
  config.teacher_steps = 1024      # T: the teacher's DDIM grid
  config.time_schedule = '1024,32,1'  # TRACT: S_0 = T > S_1 > ... > S_K; BTD: '' = halve T down to 1
  config.train_samples = 96 * 2**20   # TOTAL training samples over all phases (official train_len)
  config.batch_size = 256
  config.ema_residual = 1e-3       # evaluation EMA: m = ema_residual ** (1 / steps_per_phase)
  config.ema_reset = 'none'        # 'none' or 'phase'
  config.sema = 0.5                # self-teacher EMA momentum (TRACT)
  config.loss_reduction = 'sum'    # 'sum' over pixels (official TRACT/BTD) or 'mean'
  config.clip_x = True             # clip x_hat in TRACT's DDIM steps and in sampling
  config.student_dropout = 0.0     # tract_edm: dropout in the student (the release's flag; teacher none)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.grad_clip = 1.0
  config.optimizer.warmup_steps = 0
  # tract_edm: linear LR warm-up over this many training samples (0 = none), as the release counts
  # it; there non-finite gradient entries are also replaced (NaN -> 0, +-inf -> +-1e5).
  config.optimizer.warmup_samples = 0

  # ---- teacher training (spec section 6) -----------------------------------------------------------
  config.teacher_training = ml_collections.ConfigDict()
  config.teacher_training.train_steps = 0      # > 0: train a teacher first when no checkpoint is given
  config.teacher_training.batch_size = 128
  config.teacher_training.learning_rate = 2e-4
  config.teacher_training.warmup_steps = 1000
  config.teacher_training.ema_decay = 0.9999
  config.teacher_training.dropout = 0.2
  config.teacher_training.grad_clip = 1.0
  config.teacher_training.loss_reduction = 'mean'  # Google's teacher code: per-pixel mean
  config.teacher_training.time_sampling = 'continuous'  # 'continuous' u ~ U(0, 1) or 'grid' (i / T)

  # ---- model: the UNet of spec section 7 (CIFAR-10 teacher by default) -----------------------------
  config.model = ml_collections.ConfigDict()
  config.model.ch = 256
  config.model.emb_ch = 1024
  config.model.ch_mult = (1, 1, 1)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.num_heads = 1
  config.model.head_dim = ml_collections.FieldReference(None, field_type=int)
  config.model.out_ch = 3
  config.model.num_classes = 0
  config.model.num_groups = 32
  config.model.mean_type = 'x'     # 'x', 'both', 'eps', 'v'
  # Computation dtype of the student's convolutions, matmuls and attention: 'float32' or 'bfloat16'
  # (parameters, optimiser state, EMAs, DDIM arithmetic, targets and loss stay float32; README,
  # "Mixed precision and speed"). bfloat16 is recommended on GPU/TPU, float32 on CPU.
  config.model.dtype = 'float32'
  config.model.teacher_dtype = ''  # teacher and self-teacher forwards; '' = model.dtype
  config.model.remat = 'none'      # 'none' or 'blocks' (recompute residual/attention blocks)
  # 'ddpm': the UNet above (fields ch ... num_groups); 'edm_song' / 'edm_dhariwal': EDM's SongUNet /
  # DhariwalUNet (models/edm_networks.py) with model.edm below plus out_ch, num_classes, dtype, remat.
  config.model.arch = 'ddpm'
  config.model.edm = ml_collections.ConfigDict()  # defaults: the CIFAR-10 NCSN++ ('ve') network
  config.model.edm.model_channels = 128     # ImageNet-64 ADM: 192
  config.model.edm.channel_mult = (2, 2, 2)  # ADM: (1, 2, 3, 4)
  config.model.edm.channel_mult_emb = 4
  config.model.edm.num_blocks = 4           # ADM: 3
  config.model.edm.attn_resolutions = (16,)  # ADM: (32, 16, 8)
  config.model.edm.augment_dim = 0          # the CIFAR-10 pickles have 9 (unused when sampling)
  # SongUNet only. DDPM++ ('vp' pickles): 'positional', 1, 'standard', (1, 1).
  config.model.edm.embedding_type = 'fourier'
  config.model.edm.channel_mult_noise = 2
  config.model.edm.encoder_type = 'residual'
  config.model.edm.resample_filter = (1, 3, 3, 1)

  # ---- data ----------------------------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  # 'digits' (embedded, offline), 'cifar10', 'imagenet64', 'tfds:NAME' (any prepared TFDS image
  # dataset; 'label' optional), a directory of .png/.jpg (optionally one sub-folder per class), or
  # an .npz file with uint8 'images' (N, H, W[, C]) and optional 'labels'.
  config.data.name = 'cifar10'
  config.data.data_dir = ''        # TFDS data_dir ('' = TFDS default)
  config.data.image_size = 0       # > 0: shorter side resized (bicubic) to it, centre crop; 0: as is
  config.data.random_flip = True   # horizontal flips in the input pipeline, seeded per example
  config.data.workers = 0          # worker processes for decoding; raise for big TFDS sets (4-8)
  config.data.prefetch = 2         # batches read ahead of the device step

  # ---- devices ------------------------------------------------------------------------------------
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1            # data-parallel size; -1 = all devices not used by fsdp
  config.mesh.fsdp = 1             # > 1 shards large parameters (and optimiser state) over devices
  config.mesh.fsdp_min_size = FSDP_MIN_SIZE  # leaves with fewer elements stay replicated
  # XLA CPU devices of a CPU run (tract_jax/devices.py): 'auto' = one per core (at most 8) dividing
  # every batch, unless JAX_NUM_CPU_DEVICES / XLA_FLAGS already set a count; or a positive integer.
  # GPU/TPU runs use their accelerators whatever this says.
  config.cpu_devices = 'auto'
  config.distributed = 'auto'      # jax.distributed.initialize(): 'auto' (multi-host env), 'always', 'never'
  # Multi-host: seconds without a heartbeat after which JAX's coordination service takes a process
  # for dead and stops the others (jax.distributed.initialize's heartbeat_timeout_seconds).
  config.heartbeat_timeout_seconds = 100
  # JAX's persistent compilation cache (local or gs://; '' = off): a restart loads its compiled steps.
  config.compilation_cache_dir = '~/.cache/tract_jax/jax_cache'

  # ---- checkpoints, evaluation, logging ------------------------------------------------------------
  config.checkpoint_every = 5000   # steps; also saved at every phase end, at the end and on SIGTERM
  config.nonfinite = 'stop'        # non-finite loss/gradients: 'stop' with an error, or 'skip' the update
  config.overwrite = False         # reuse a workdir whose saved config is incompatible (deletes its state)
  config.keep_checkpoints = 2
  config.log_every = 100
  config.eval = ml_collections.ConfigDict()
  config.eval.num_samples = 64     # samples in each grid (fixed noise, shared by teacher and students)
  config.eval.sample_batch = 64
  config.eval.metrics = ('agreement',)  # of 'agreement', 'digits_fid' (embedded digits), 'fid', 'kid'
  config.eval.fid_samples = 50_000       # the paper's FID@50k ('fid' and 'kid' share these samples)
  config.eval.fid_resize = 'torch'       # 299x299 resize: 'torch' (paper's code, pytorch-fid) or 'tf1'
  config.eval.inception_batch = 200      # images per Inception call; divisible by the devices
  config.eval.kid_subsets = 100          # KID: subsets of the features, mean and std over them
  config.eval.kid_subset_size = 1000
  config.eval.inception_weights = ''     # converted FID Inception weights (.npz), see README
  config.eval.reference_stats = ''       # training-set statistics (.npz) from reference_stats
  config.eval.params = ''                # mode=evaluate/sample: params checkpoint ('' = the workdir's)
  config.eval.steps = 0                  # mode=evaluate/sample: sampling steps (0 = the student's)
  config.eval.output = ''                # mode=sample: .npz path ('' = DIR/samples_<steps>steps.npz)
  config.eval_every = 0                  # steps between in-loop evaluations (0 = phase ends only)
  return config
