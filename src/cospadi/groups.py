"""Which blocks form a group in per-group mode (docs/method.md "Per-group mode"):
consecutive blocks in groups of `group_size`; which of their linears share a factor is
the family adapter's rule (adapters.Adapter.shared).

When group_size does not divide the number of blocks, the last group is shorter: 30
blocks in groups of 4 give seven groups of 4 and one of 2; a last group of one block is
compressed per layer (its budget formula is then the per-layer one). A group size larger
than the model puts every block in one group."""
from __future__ import annotations

from .errors import CospadiError
from .methods import REGISTRY, Method


def check_group_size(group_size: int, method: Method) -> None:
    """CospadiError unless `group_size` is an integer >= 1 that `method` supports."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise CospadiError(f"group size {group_size!r} must be an integer >= 1 (1: per layer; the paper: 2)")
    if group_size > 1 and not method.shares:
        grouped = ", ".join(name for name, m in REGISTRY.items() if m.shares)
        raise CospadiError(f"method {method.name} compresses each layer on its own and takes no --group-size; "
                           f"share factors across blocks with one of: {grouped}")


def resolve_group_size(method: Method, group_size: int | None) -> int:
    """The group size a run uses: `group_size`, or the method's default when None."""
    size = method.default_group_size if group_size is None else group_size
    check_group_size(size, method)
    return size


def block_groups(n_blocks: int, group_size: int) -> list[list[int]]:
    """Consecutive block indices 0 .. n_blocks - 1 cut into groups of `group_size`, the
    last one shorter when group_size does not divide n_blocks (see the module docstring).
    E.g. block_groups(5, 2) == [[0, 1], [2, 3], [4]]."""
    if n_blocks < 1:
        raise CospadiError("the model has no decoder blocks to compress")
    if not isinstance(group_size, int) or group_size < 1:
        raise CospadiError(f"group size {group_size!r} must be an integer >= 1")
    return [list(range(start, min(start + group_size, n_blocks))) for start in range(0, n_blocks, group_size)]
