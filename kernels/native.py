"""The four subspace ops as fused C loops on CPU (``native.c``), compiled on first use.

combine and project (every fit step): the torch references convert each chunk of codes to float32, scale it,
sum it over rows and add the mean in separate passes; at 100M parameters that made a fit step 2.5x a plain
forward and backward. The C loops decode each basis byte in registers and read it once per op.

gram and orth_quantize (the subspace build): the torch references make several passes over cache-sized chunks
of a stacked ``[K, n]`` copy of the candidates. The C loops take the K candidates' rows where they lie (a
``[K, n]`` tensor whose rows may lie apart, or a :class:`layout.Rows` of the tensors as the reader mapped them:
no stacking copy) and do each run of columns, or each quantization group, in L1. ``gram`` uses the same runs
as the reference (fixed by the parameter: see ``reference.gram_torch``) and sums each in another fixed order;
``orth_quantize`` performs the reference's float32 operations in its order, so its codes, scales and offsets
are the reference's bit for bit.

Like Triton, which builds its launcher with the system C compiler, the shared library is compiled
at first use with ``$CC`` (default ``cc``) for this CPU (``-march=native``) and cached under
``$TWAMERGE_CACHE_DIR`` (default ``~/.cache/twamerge``), keyed by the source, the compiler, its
flags and the CPU. It is then checked against the torch reference on small inputs; if there is no
compiler, the build fails or the check disagrees, :func:`status` says why and dispatch runs the
torch reference. Signatures, shapes and dtypes are those of the ``<op>_torch`` references;
only packed bases (1, 2, 4, 8 bits), float32 or bfloat16 candidates, a float32 mean and float32 or bfloat16
``out`` / ``grad`` are taken (:func:`unsupported`). Work is split over ``torch.get_num_threads()`` threads by
ranges of groups (gram: of segments of runs); ctypes releases the GIL during each call, and the result does
not depend on the split.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .layout import (
    FLOAT_BITS,
    Rows,
    check_combine_args,
    check_gram_args,
    check_orth_quantize_args,
    check_orth_quantize_out,
    check_project_args,
    codes_shape,
    stacked,
    storage_dtype,
)
from .reference import GRAM_RUN, centred_gram, gram_breaks, gram_torch, reduce_groups

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")
# Tried first; dropped when the compiler does not know it (e.g. clang on some ARM hosts).
ARCH_FLAGS = ("-march=native",)

_lock = threading.Lock()
_pool_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: tuple[bool, str] | None = None
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def _forget_pool() -> None:
    """A forked child has none of the pool's threads: it starts a pool of its own when it needs one."""
    global _pool, _pool_workers, _pool_lock
    _pool, _pool_workers, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _cache_dir() -> Path:
    root = os.environ.get("TWAMERGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "twamerge")
    return Path(root) / "native"


def _cpu_id() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for), so a cache shared between
    machines never hands one a library built for another's instructions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C compiler {cc!r} not found ({type(exc).__name__}); set CC or install gcc") from exc


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile into a temporary beside ``target`` and rename it there; the compiler's error, or None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            return (proc.stderr or proc.stdout).strip() or f"{cc} exited with {proc.returncode}"
        os.replace(tmp, target)  # atomic: concurrent builders all leave a whole library
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    version = _compiler_version(cc)
    errors = []
    for flags in (FLAGS + ARCH_FLAGS, FLAGS):
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *flags, _cpu_id()]).encode()).hexdigest()
        target = _cache_dir() / f"twamerge_native_{key[:20]}.so"
        if not target.exists():
            try:
                error = _compile(cc, flags, target)
            except OSError:  # cache not writable: build in a private temporary folder instead
                target = Path(tempfile.mkdtemp(prefix="twamerge_native_")) / target.name
                error = _compile(cc, flags, target)
            if error:
                errors.append(error.splitlines()[-1])
                continue
        lib = ctypes.CDLL(str(target))
        lib.twa_combine.argtypes = [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64,
                                    _int, _ptr, _int]
        lib.twa_project.argtypes = [_ptr, _int, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _int,
                                    _ptr, _i64]
        lib.twa_gram.argtypes = [_ptr, _int, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr]
        lib.twa_orth_quantize.argtypes = [_ptr, _int, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _ptr, _i64,
                                          _ptr, _i64, _ptr, _i64]
        lib.twa_combine.restype = lib.twa_project.restype = _int
        lib.twa_gram.restype = lib.twa_orth_quantize.restype = _int
        return lib
    raise RuntimeError(f"{cc} could not compile {SOURCE.name}: {errors[-1] if errors else 'unknown error'}")


def _self_check() -> str | None:
    """Compare every op with the torch reference on small inputs of every bit width; the problem or None."""
    from .reference import combine_torch, orth_quantize_torch, project_torch, quantize_torch

    gen = torch.Generator().manual_seed(0)
    rows, cols, group = 3, 512, 64
    basis = torch.randn(rows, cols, generator=gen)
    mean = torch.randn(cols, generator=gen)
    group_block = (torch.arange(cols // group, dtype=torch.int32) >= 3).to(torch.int32)
    beta = torch.randn(2, rows, generator=gen)
    grad = torch.randn(cols, generator=gen)
    for bits in (1, 2, 4, 8):
        args = quantize_torch(basis, bits, group)
        want = combine_torch(mean, *args, beta, group_block, bits, group)
        got = combine_native(mean, *args, beta, group_block, bits, group)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            return f"combine disagrees with the torch reference at bits={bits}"
        want = project_torch(grad, *args, group_block, 2, bits, group)
        got = project_native(grad, *args, group_block, 2, bits, group)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return f"project disagrees with the torch reference at bits={bits}"
    # gram: the same runs as the reference, summed in another order (float32 rounding of the partials); a row
    # split at a run boundary gives the same partials.
    x = basis[:, :300] * 0.01 + torch.randn(300, generator=gen)
    want_g, want_m = gram_torch(x, 5, 37, 16)
    got_g, got_m = gram_native(x, 5, 37, 16)
    if not torch.allclose(got_g, want_g, rtol=1e-5, atol=1e-5 * float(want_g.abs().max())) or not torch.allclose(
            got_m, want_m, rtol=1e-6, atol=1e-6):
        return "gram disagrees with the torch reference"
    parts = gram_native(Rows(list(x[:, :27])), 5, 37, 16)[0] + gram_native(x[:, 27:], 32, 37, 16)[0]
    if not torch.allclose(parts, got_g, rtol=1e-12, atol=1e-12 * float(got_g.abs().max())):
        return "gram depends on where its columns are cut"
    # orth_quantize: the same float32 operations in the same order as the reference: identical codes.
    transform = torch.randn(2, rows, generator=gen) * 3
    for bits in (1, 2, 4, 8):
        want = orth_quantize_torch(basis, mean, transform, bits, group)
        got = orth_quantize_native(basis, mean, transform, bits, group)
        if not all(torch.equal(a, b) for a, b in zip(want, got)):
            return f"orth_quantize disagrees with the torch reference at bits={bits}"
    return None


def status() -> tuple[bool, str]:
    """(usable, reason): builds and checks the library on the first call; cached."""
    global _lib, _status
    with _lock:
        if _status is None:
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, a failed build, an unloadable library
                _status = (False, f"the C kernels are unavailable: {exc}")
            else:
                _status = (True, "compiled C kernels")
                problem = _self_check()
                if problem:
                    _lib, _status = None, (False, f"the C kernels are not used: {problem}")
    return _status


# The tensor whose dtype ``unsupported`` checks, per op.
_DTYPE_OF = {"gram": "x", "orth_quantize": "x", "combine": "out", "project": "grad"}


def unsupported(op: str, *, bits: int | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Why the C kernel of ``op`` cannot take these arguments, or None when it can."""
    if bits is not None and bits in FLOAT_BITS:
        return f"the C {op} kernel takes packed codes (1, 2, 4, 8 bits); bits={bits}"
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
        return f"the C {op} kernel takes float32 or bfloat16 {_DTYPE_OF[op]}; got {dtype}"
    return None


def _library() -> ctypes.CDLL:
    if _lib is None:
        ok, why = status()
        if not ok or _lib is None:
            raise RuntimeError(why)
    return _lib


def _split(n_groups: int) -> list[tuple[int, int]]:
    """Group ranges, one per torch thread (no more than one per 64 groups)."""
    parts = max(1, min(torch.get_num_threads(), n_groups // 64))
    bounds = [n_groups * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


def _run(fn, ranges: list[tuple[int, int]], make_args) -> None:
    """Call ``fn(*make_args(g0, g1))`` for each group range, on the pool when there are several."""
    global _pool, _pool_workers
    if len(ranges) == 1:
        codes = [fn(*make_args(*ranges[0]))]
    else:
        with _pool_lock:
            if _pool_workers < len(ranges):  # more torch threads than before: a bigger pool
                _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="twamerge-native")
                _pool_workers = len(ranges)
            pool = _pool
        codes = list(pool.map(lambda r: fn(*make_args(*r)), ranges))
    if any(codes):
        raise MemoryError("the C kernel could not allocate its tile buffers")


def _check_group_block(group_block: torch.Tensor, n_blocks: int) -> None:
    if group_block.numel() and (int(group_block.min()) < 0 or int(group_block.max()) >= n_blocks):
        raise ValueError(f"group_block holds block ids outside [0, {n_blocks}); expected ids of the {n_blocks} blocks")


def combine_native(mean, codes, scales, zeros, beta, group_block, bits, group_size, out=None):
    """:func:`reference.combine_torch` in one fused pass per row of codes."""
    rows, cols = check_combine_args(mean, codes, scales, zeros, beta, group_block, bits, group_size, out)
    why = unsupported("combine", bits=bits, dtype=None if out is None else out.dtype)
    if why:
        raise ValueError(why)
    if mean.device.type != "cpu":
        raise ValueError(f"the C combine kernel takes CPU tensors; got {mean.device}")
    if out is None:
        out = torch.empty(cols, dtype=torch.float32)
    if cols == 0:
        return out
    _check_group_block(group_block, beta.shape[0])
    lib = _library()
    n_groups = cols // group_size
    bf16 = int(out.dtype == torch.bfloat16)
    _run(lib.twa_combine, _split(n_groups), lambda g0, g1: (
        mean.data_ptr(), codes.data_ptr(), codes.stride(0), scales.data_ptr(), scales.stride(0), zeros.data_ptr(),
        zeros.stride(0), beta.data_ptr(), group_block.data_ptr(), rows, g0, g1, group_size, bits, out.data_ptr(),
        bf16))
    return out


def project_native(grad, codes, scales, zeros, group_block, n_blocks, bits, group_size):
    """:func:`reference.project_torch` in one fused pass per row of codes; per-group partials are
    reduced into blocks by the same :func:`reference.reduce_groups`."""
    rows, cols = check_project_args(grad, codes, scales, zeros, group_block, bits, group_size)
    why = unsupported("project", bits=bits, dtype=grad.dtype)
    if why:
        raise ValueError(why)
    if grad.device.type != "cpu":
        raise ValueError(f"the C project kernel takes CPU tensors; got {grad.device}")
    n_groups = cols // group_size
    partial = torch.empty(rows, n_groups, dtype=torch.float32)
    if n_groups:
        _check_group_block(group_block, n_blocks)
        lib = _library()
        bf16 = int(grad.dtype == torch.bfloat16)
        _run(lib.twa_project, _split(n_groups), lambda g0, g1: (
            grad.data_ptr(), bf16, codes.data_ptr(), codes.stride(0), scales.data_ptr(), scales.stride(0),
            zeros.data_ptr(), zeros.stride(0), rows, g0, g1, group_size, bits, partial.data_ptr(), partial.stride(0)))
    return reduce_groups(partial, group_block, n_blocks)


# Columns of one float64 partial sum of the Gram matrix, in runs (twa_gram): threads take whole segments, and
# the segments' sums are added in order, so the result does not depend on the number of threads.
SEGMENT_RUNS = 512


def _row_pointers(x) -> ctypes.Array:
    """The K row addresses of a [K, n] tensor (rows may lie apart) or a :class:`Rows`."""
    if isinstance(x, Rows):
        ptrs = [r.data_ptr() for r in x.rows]
    else:
        ptrs = [x.data_ptr() + i * x.stride(0) * x.element_size() for i in range(x.shape[0])]
    return (ctypes.c_void_p * len(ptrs))(*ptrs)


def _check_input(op: str, x) -> int:
    why = unsupported(op, dtype=x.dtype)
    if why:
        raise ValueError(why)
    if x.device.type != "cpu":
        raise ValueError(f"the C {op} kernel takes CPU tensors; got {x.device}")
    return int(x.dtype == torch.bfloat16)


def gram_native(x, start: int = 0, period: int = 0, run: int = GRAM_RUN):
    """:func:`reference.gram_torch` in one pass over the K rows (a [K, n] tensor or a :class:`Rows`): each
    run's differences, mean and float32 pair products computed in L1, the partials added in float64 (the
    same runs as the reference, summed in another fixed order)."""
    k, n = check_gram_args(x)
    start, period, run = gram_breaks(start, period, run)
    bf16 = _check_input("gram", x)
    if k <= 1 or n == 0:
        return gram_torch(stacked(x), start, period, run)
    lib = _library()
    rows = k - 1
    seg = run * SEGMENT_RUNS
    first = start // seg
    n_segs = (start + n - 1) // seg - first + 1
    slots = torch.zeros(n_segs, rows, rows, dtype=torch.float64)
    mean = torch.empty(n, dtype=torch.float32)
    ptrs = _row_pointers(x)

    def args(s0: int, s1: int):
        c0 = max(0, (first + s0) * seg - start)
        c1 = min(n, (first + s1) * seg - start)
        return (ptrs, bf16, k, c0, c1, start, period, run, seg, slots.data_ptr() + s0 * rows * rows * 8,
                mean.data_ptr())

    parts = max(1, min(torch.get_num_threads(), n_segs))
    bounds = [n_segs * i // parts for i in range(parts + 1)]
    _run(lib.twa_gram, [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]], args)
    upper = slots.sum(dim=0).triu()
    return centred_gram(upper + upper.triu(1).T, k), mean


def orth_quantize_native(x, mean, transform, bits, group_size, out=None):
    """:func:`reference.orth_quantize_torch` one group at a time: the K rows (a [K, n] tensor or a
    :class:`Rows`) centred, multiplied by ``transform`` and quantized while the group is in L1."""
    k, n, rows = check_orth_quantize_args(x, mean, transform, bits, group_size)
    out = check_orth_quantize_out(out, rows, n, bits, group_size, x.device)
    why = unsupported("orth_quantize", bits=bits, dtype=x.dtype)
    if why:
        raise ValueError(why)
    bf16 = _check_input("orth_quantize", x)
    if out is not None:
        codes, scales, zeros = out
    else:
        codes = torch.empty(codes_shape(rows, n, bits), dtype=storage_dtype(bits))
        scales = torch.empty(rows, n // group_size, dtype=torch.float32)
        zeros = torch.empty(rows, n // group_size, dtype=torch.float32)
    if rows == 0 or n == 0:
        return codes, scales, zeros
    lib = _library()
    ptrs = _row_pointers(x)
    _run(lib.twa_orth_quantize, _split(n // group_size), lambda g0, g1: (
        ptrs, bf16, k, mean.data_ptr(), transform.data_ptr(), rows, g0, g1, group_size, bits, codes.data_ptr(),
        codes.stride(0), scales.data_ptr(), scales.stride(0), zeros.data_ptr(), zeros.stride(0)))
    return codes, scales, zeros
