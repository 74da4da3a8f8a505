"""The compiled kernels of the sparse path: y = (x D) S with S held as values (d2, s) and
a per-column bit pattern (d2, ceil(k / 16)) int16 (bitmask.py), in a small C++ torch
library built on first use with the system C++ compiler and cached.

    torch.ops.cospadi_ell.dict_bitmap(x, D, values, pattern):
        z = x D                                                x (n, d1), D (d1, k)
        y[r, j] = sum over column j's set bits i (t-th of them) of values[j, t] z[r, i]
    torch.ops.cospadi_ell.bitmap_dense(values, pattern, k, dtype): S^T (d2, k) for the dense path
    torch.ops.cospadi_ell.bf16_panels(): whether this build has the bf16 panels

z is formed in float32 inside for up to GEMM_ROWS rows, reading D at its stored width (a
bf16 D in a float32 model is never copied to float32): for one row, D streamed row after
row (each thread its own rows into its own z, summed at the end); for 2-32 rows,
accumulators in registers, D's rows streamed once per group of up to 4 rows of x;
longer inputs use torch's GEMM.
Values may be float32, bfloat16 or float16; sums run in float32 and y comes back at x's
dtype. Up to WALK_ROWS rows (8 for a bf16 model) walk each column's 16-bit words: the
word's popcount(m) next values are placed into the lanes its bits select by one register
`vpexpandw`/`vexpandps` (AVX-512 VBMI2) and multiply-added against 16 contiguous floats of
each row of z, no gather and no index. More rows: at float32, a block of 64 columns' rows
is decoded from the bits (`vpcompressd`) into a scratch buffer, then 16-row tiles of a
transposed z run; for a bf16 model on a CPU with AVX-512 BF16, panels of 48 columns of S
are decoded from the bits into atom-pair order and run as a register-tiled GEMM with
`vdpbf16ps` against z as it is (ell_native_panels.py; S^T is never materialised). Without
AVX-512 VBMI2 the walks run as scalar tzcnt/blsr bit walks. Every call checks that each
column has exactly s bits (RuntimeError otherwise).
Threads: torch's own (at::parallel_for over the columns of z and of y).

`load()` returns the operator namespace, or None when there is no compiler, the build
fails, or COSPADI_NATIVE=0; kernels.py then runs its pure-PyTorch fallback (same results
up to float rounding: the order of the additions differs). The shared library is built
once per source, torch version and CPU (`-march=native`), into cospadi's cache
(`$COSPADI_CACHE/kernels`, or ~/.cache/cospadi/kernels), written under a temporary name
and renamed, so concurrent processes never load a half-written file."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .ell_native_source import SOURCE

FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w")


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted) or platform.machine()


def library_path() -> Path:
    """Where the shared library for this source, torch build and CPU lives."""
    from ..models import cache_dir  # lazy: layers do not depend on the model code otherwise

    key = hashlib.sha256("\n".join((SOURCE, torch.__version__, " ".join(FLAGS), _cpu_signature())).encode())
    return cache_dir() / "kernels" / f"cospadi_ell-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    """Compile SOURCE into `target` (atomically); CalledProcessError / OSError on failure."""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++, g++ or $CXX) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = target.with_name(f".{target.stem}.{os.getpid()}.cpp")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    try:
        source.write_text(SOURCE)
        command = [compiler, *FLAGS, abi, *(f"-I{p}" for p in include_paths()), str(source), "-o", str(tmp),
                   *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        source.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


@cache
def load() -> Any:
    """The operator namespace torch.ops.cospadi_ell (dict_bitmap(x, dictionary, values,
    pattern), bitmap_dense(values, pattern, atoms, dtype)), built on first call if needed;
    None when the native kernel is disabled (COSPADI_NATIVE=0) or cannot be built or
    loaded (a warning says why, once per process)."""
    if os.environ.get("COSPADI_NATIVE", "1") == "0":
        return None
    try:
        target = library_path()
        if not target.is_file():
            _build(target)
        torch.ops.load_library(str(target))
        return torch.ops.cospadi_ell
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) else [str(exc)]
        warnings.warn(f"cospadi: the compiled sparse kernel is unavailable ({(detail or ['?'])[0]}); "
                      "using the PyTorch fallback", RuntimeWarning, stacklevel=2)
        return None


@cache
def has_bf16_panels() -> bool:
    """Whether the compiled kernels are loaded and have the bf16 panels (the CPU has AVX-512
    BF16): the sparse path of a bf16 model then takes many rows too (kernels.max_sparse_rows)."""
    op = load()
    return op is not None and bool(op.bf16_panels())
