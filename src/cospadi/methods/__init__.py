"""The registry of compression methods. Each method is one Method object in one file of
this package; adding a method is that file plus one line below."""
from __future__ import annotations

from ..errors import CospadiError
from .base import Budget, Method
from .basis_sharing import BasisSharing
from .cospadi import Cospadi
from .svd import Svd
from .svd_llm import SvdLlm

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry under method.name (replacing one of the same name)."""
    REGISTRY[method.name] = method
    return method


for _method in (Svd(), SvdLlm(), BasisSharing(), Cospadi()):  # a new method: one more entry here
    register(_method)


def get_method(name: str) -> Method:
    """The registered method called `name`; CospadiError listing the known ones."""
    if name not in REGISTRY:
        raise CospadiError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(REGISTRY)


__all__ = ["Budget", "Method", "REGISTRY", "get_method", "method_names", "register"]
