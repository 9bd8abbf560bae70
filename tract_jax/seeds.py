"""Offsets added to config.seed, one per random stream, so that the streams never share a key.

config.seed itself seeds the teacher job: its parameter init, its train state's RNG and its input
pipeline.
"""
DISTILLATION = 1        # the distillation state's RNG and its input pipeline
EVAL_NOISE = 1_000_003  # the evaluator's fixed noise and labels (grids, agreement, mode=sample)
FID_NOISE = 2_000_003   # the fresh samples the Inception FID and KID score
