"""The registry of compression methods. Each method is one Method object in one file of
this package; adding a method is that file plus one line below."""
from __future__ import annotations

from ..errors import CospadiError
from .base import Budget, Method
from .basis_sharing import BasisSharing
from .cospadi import Cospadi
from .quantized import Gptq, Rtn, check_quant
from .svd import Svd
from .svd_llm import SvdLlm

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry under method.name (replacing one of the same name)."""
    REGISTRY[method.name] = method
    return method


for _method in (Svd(), SvdLlm(), BasisSharing(), Cospadi()):  # a new method: one more entry here
    register(_method)

# quantization alone (docs/quantization.md): get_method finds them, method_names() (the
# factorization methods, which every ratio applies to) does not list them
QUANTIZERS: dict[str, Method] = {method.name: method for method in (Rtn(), Gptq())}


def get_method(name: str) -> Method:
    """The registered method (or quantization-only baseline) called `name`; CospadiError
    listing the known ones."""
    method = REGISTRY.get(name) or QUANTIZERS.get(name)
    if method is None:
        raise CospadiError(f"unknown method {name!r}; choose one of: {', '.join([*REGISTRY, *QUANTIZERS])}")
    return method


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(REGISTRY)


__all__ = ["Budget", "Method", "QUANTIZERS", "REGISTRY", "check_quant", "get_method", "method_names", "register"]
