"""CPU settings for training: thread budgets for TensorFlow, BLAS/OpenMP and the data loaders.

Training runs two kinds of work side by side: augmentation (numpy and Pillow, in loader threads)
and the model (TensorFlow's intra-op pool). Left alone, TensorFlow sizes its pools to every core,
numpy's OpenBLAS starts a pool of its own, and the loaders come on top: on a small machine more
threads than cores spin and yield against each other. ``thread_plan`` splits the cores the
process may run on between the loaders and TensorFlow; ``configure_threads`` applies it.

The rest of the system time was the allocator: glibc hands large freed blocks back to the kernel
at once, so every training step faulted its tensors' pages in again (about 1,250 page faults
per image in fine-tuning). ``configure_threads`` also tells it to keep them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Libraries that read these when they start: OpenMP and MKL users, OpenBLAS, numexpr.
_LIBRARY_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
# numpy's wheels bundle OpenBLAS under a prefixed name (scipy-openblas); plain builds use the first.
_OPENBLAS_SETTERS = (
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
)


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads each part of training gets.

    Attributes:
        cpus: cores planned for (the process's CPU affinity unless overridden).
        loaders: data-loading (augmentation) threads.
        intra_op: TensorFlow threads inside one operation (convolutions, matrix products).
        inter_op: TensorFlow operations run at once (1: the network is one chain of layers).
        library: threads for BLAS / OpenMP / MKL calls made from the loaders (1: the loaders are
            the parallelism; their arrays are small).
    """

    cpus: int
    loaders: int
    intra_op: int
    inter_op: int
    library: int = 1


def available_cpus() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def thread_plan(cpus: int | None = None, loaders: int | None = None) -> ThreadPlan:
    """Share ``cpus`` cores between loader threads and TensorFlow.

    Augmenting a view (recipe v3) costs more CPU time than running it through MobileNetV2
    (measured on 2 cores: about 10 ms against 6 ms a view, a fine-tuning step 7 ms), and loader
    threads spend part of their time waiting for Python's lock, so the loaders get one thread a
    core and TensorFlow half the cores; BLAS and OpenMP stay single-threaded. On 2 cores that is
    2 loaders and 1 TensorFlow thread: a strict 1 + 1 split left a core idle while the single
    loader fell behind (backbone features 10.7-16.9 ms a view against 8.2-9.1 ms, same machine
    and load); 2 + 2 was no faster than 2 + 1.

    Args:
        cpus: cores to use (default: ``available_cpus()``).
        loaders: loader threads (default: one a core).

    Returns:
        The plan; nothing is applied (see ``configure_threads``).
    """
    cpus = max(1, int(cpus or available_cpus()))
    loaders = max(1, int(loaders) if loaders else cpus)
    return ThreadPlan(cpus=cpus, loaders=loaders, intra_op=max(1, cpus // 2), inter_op=1)


def configure_threads(plan: ThreadPlan) -> dict[str, bool]:
    """Apply a plan to this process: environment, the loaded OpenBLAS, and TensorFlow.

    Environment variables reach libraries started later (TensorFlow reads
    ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` when its runtime starts); numpy's
    OpenBLAS is already loaded, so it is told through its own call. TensorFlow's pools can only be
    sized before its first operation: call this before training starts.

    Returns:
        What took effect: {"openblas", "malloc", "tensorflow"} -> bool (False: TensorFlow already
        running, or the library was not found).
    """
    for name in _LIBRARY_VARIABLES:
        os.environ[name] = str(plan.library)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(plan.intra_op)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(plan.inter_op)
    applied = {"openblas": _limit_openblas(plan.library), "malloc": keep_freed_memory(), "tensorflow": False}
    tf = sys.modules.get("tensorflow")
    if tf is None:
        applied["tensorflow"] = True  # the environment above sizes it when it starts
        return applied
    try:
        tf.config.threading.set_intra_op_parallelism_threads(plan.intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(plan.inter_op)
        applied["tensorflow"] = True
    except RuntimeError:  # its runtime has started (e.g. an earlier model in this process)
        applied["tensorflow"] = (
            tf.config.threading.get_intra_op_parallelism_threads() == plan.intra_op
            and tf.config.threading.get_inter_op_parallelism_threads() == plan.inter_op
        )
    return applied


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold_mb: int = 32, trim_threshold_mb: int = 1024) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    Blocks up to ``mmap_threshold_mb`` (glibc's largest allowed, 32 MB) come from the heap
    instead of their own mapping, and the heap is trimmed only when more than
    ``trim_threshold_mb`` lies free at its top. Peak memory is what training needs anyway; the
    page faults of mapping it again on every step go.

    Returns:
        True where applied (glibc), False elsewhere (musl, macOS: nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return all(
        mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold_mb * 2**20),
            (_M_TRIM_THRESHOLD, trim_threshold_mb * 2**20),
            (_M_TOP_PAD, 64 * 2**20),
        )
    )


def _limit_openblas(threads: int) -> bool:
    """Set the thread count of the OpenBLAS numpy loaded, if it can be found."""
    if "numpy" not in sys.modules:
        return True  # OPENBLAS_NUM_THREADS applies when it loads
    library = _openblas()
    setter = next((getattr(library, n) for n in _OPENBLAS_SETTERS if hasattr(library, n)), None)
    if setter is None:
        return False
    setter(ctypes.c_int(threads))
    return True


def openblas_threads() -> int | None:
    """Threads of the OpenBLAS numpy uses now (None: not found)."""
    library = _openblas()
    names = [n.replace("set_num_threads", "get_num_threads") for n in _OPENBLAS_SETTERS]
    getter = next((getattr(library, n) for n in names if hasattr(library, n)), None)
    return int(getter()) if getter is not None else None


def _openblas():
    """numpy's OpenBLAS (the copy its wheel bundles, or the first found beside it), or None."""
    import numpy

    folder = Path(numpy.__file__).parent
    for path in sorted((folder.parent / "numpy.libs").glob("*openblas*")) + sorted(folder.glob("*openblas*")):
        try:
            return ctypes.CDLL(str(path))  # already loaded: dlopen hands back the same copy
        except OSError:
            continue
    return None
