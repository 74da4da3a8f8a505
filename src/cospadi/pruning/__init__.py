"""Depth pruning: ReplaceMe (arXiv 2505.02819) cuts a run of consecutive decoder blocks and
merges a linear map that replaces them into the block before the cut (docs/pruning.md).
It is not a per-matrix Method: api.compress hands depth names (plan.py) to compress.py,
which runs run.py's passes over replaceme.py's pure functions. compress.py and save.py are
imported where used (compress.py calls back into api.compress)."""
from .plan import DepthMethod, blocks_for_ratio, check_plan, is_depth_method, parse_depth_method, uses_solver_options
from .replaceme import cosine_map, lstsq_map, mean_cosine_distance, merge_map, remove_blocks, select_run
from .run import Pruned, replaceme

__all__ = ["DepthMethod", "Pruned", "blocks_for_ratio", "check_plan", "cosine_map", "is_depth_method", "lstsq_map",
           "mean_cosine_distance", "merge_map", "parse_depth_method", "remove_blocks", "replaceme", "select_run",
           "uses_solver_options"]
