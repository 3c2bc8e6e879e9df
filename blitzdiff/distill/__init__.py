"""Few-step students by distillation: one trainer loop (trainer.py), pluggable targets (progressive_distillation.py,
consistency_distillation.py),
training images (data.py), and the API that turns a teacher into a student pipeline folder (run.py; the function
`progressive` is exported here).

    blitzdiff.distill.progressive("dit-digits", "out/pd", steps_from=64, steps_to=4, iters_per_round=2000,
                                  batch=64, lr=1e-4, guidance=1.25)
"""

from .consistency_distillation import ConsistencyTarget
from .data import load_images
from .progressive_distillation import ProgressiveTarget
from .run import consistency, progressive
from .trainer import Batch, Trainer

__all__ = ["Batch", "ConsistencyTarget", "ProgressiveTarget", "Trainer", "consistency", "load_images", "progressive"]
