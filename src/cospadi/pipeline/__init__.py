"""Block-by-block calibration and compression, in passes: capture (capture.py), calibrate
(calibrate.py), solve (solve.py), and the loop that runs them with propagation and
checkpoints (run.py)."""
from .calibrate import accumulate_grams, calibrate_block
from .capture import BlockKwargs, capture_block_inputs, run_block
from .run import Recipe, check_recipe, compress_blocks, unique_param_count

__all__ = ["BlockKwargs", "Recipe", "accumulate_grams", "calibrate_block", "capture_block_inputs", "check_recipe",
           "compress_blocks", "run_block", "unique_param_count"]
