"""Which blocks form a group in per-group mode (docs/method.md "Per-group mode"):
consecutive blocks in groups of `group_size`; which of their linears share a factor is
the run's `share` (shared_adapter): the user's choice, else the method's default
(Method.default_share), else the family adapter's rule (adapters.Adapter.shared, the
Basis Sharing protocol: q, k, v, gate and up).

When group_size does not divide the number of blocks, the last group is shorter: 30
blocks in groups of 4 give seven groups of 4 and one of 2; a last group of one block is
compressed per layer (its budget formula is then the per-layer one). A group size larger
than the model puts every block in one group."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .adapters import Adapter
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


def parse_share(share: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A --share value ("gate,up"; a sequence of names; None) as a tuple of names, None
    when not given."""
    if share is None:
        return None
    names = tuple(part.strip() for part in (share.split(",") if isinstance(share, str) else share))
    if not names or not all(names):
        raise CospadiError(f"--share {share!r} names no linear: give kinds such as q,k,v,gate,up")
    return names


def linear_kind(name: str) -> str:
    """A linear's kind, the short name --share takes: "gate" for "mlp.gate_proj" (a kind is its own kind)."""
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def shared_adapter(adapter: Adapter, method: Method, share: Sequence[str] | None = None) -> Adapter:
    """`adapter` whose shared linears are `share` (None: method.default_share, None there:
    the adapter's own). A name is a linear's full name in the block ("mlp.gate_proj") or its
    kind ("gate" for gate_proj); CospadiError naming one that matches no target."""
    names = share if share is not None else method.default_share
    if names is None:
        return adapter
    kinds = {linear_kind(target): target for target in adapter.targets}
    chosen = []
    for name in names:
        target = name if name in adapter.targets else kinds.get(name)
        if target is None:
            raise CospadiError(f"--share {name!r} is no linear of a {adapter.family} block; choose from "
                               f"{', '.join(kinds)}")
        chosen.append(target)
    return replace(adapter, shared=tuple(t for t in adapter.targets if t in chosen))
