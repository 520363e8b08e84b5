"""FAISS mechanics: make, train and fill indexes, search parameters, read and write files.

Vectors are unit length, so inner product is cosine similarity and every index uses
``METRIC_INNER_PRODUCT``.  A GPU build of FAISS is used when one is installed and a GPU
is present; indexes are always stored in their CPU form, so a file written on a GPU
machine opens anywhere.  An index whose inverted lists live in a separate file (on-disk
lists, :mod:`.ondisk`) is opened by handing :func:`load_index` both paths.
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import InputError
from ..store.files import atomic_path

GPU_MAX_K = 2048  # FAISS GPU indexes answer at most this many neighbours per query
MADV_DONTNEED = 4


# ------------------------------------------------------------------------------ make

def new_index(factory: str, d: int) -> faiss.Index:
    return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)


def check_factory(factory: str, d: int) -> str:
    """``factory`` if FAISS can build an index of dimension ``d`` from it, else InputError."""
    try:
        new_index(factory, d)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise InputError(f"FAISS cannot build {factory!r} for dimension {d}: {first}") from None
    return factory


def ivf_of(index: faiss.Index) -> Any:
    """The IVF part of ``index`` (through pre-transforms), or None."""
    return faiss.try_extract_index_ivf(index)


def describe(factory: str, d: int) -> tuple[int, int]:
    """(number of lists, bytes per stored vector) of ``factory``; 0 lists if not IVF."""
    index = new_index(factory, d)
    ivf = ivf_of(index)
    if ivf is not None:
        return int(ivf.nlist), int(ivf.code_size)
    hnsw = _hnsw(index)
    if hnsw is not None:
        return 0, d * 4 + hnsw.hnsw.nb_neighbors(0) * 4 * 2
    return 0, int(getattr(faiss.downcast_index(index), "code_size", d * 4))


def train_index(factory: str, sample: np.ndarray, seed: int = 0,
                gpu: bool = False) -> faiss.Index:
    """An empty index of ``factory`` trained on ``sample`` (seeded k-means)."""
    x = as_f32(sample)
    index = new_index(factory, x.shape[1])
    if index.is_trained:
        return index
    ivf = ivf_of(index)
    codec = faiss.downcast_index(ivf) if ivf is not None else faiss.downcast_index(index)
    if hasattr(codec, "do_polysemous_training"):
        # Only polysemous (Hamming) search needs it, and it costs most of PQ training.
        codec.do_polysemous_training = False
    if ivf is not None:
        ivf.cp.seed = seed
        if ivf.nlist > len(x):
            raise InputError(f"{factory}: {ivf.nlist} lists need at least as many training "
                             f"vectors, got {len(x)}")
    work = to_gpu(index) if gpu and gpu_supported(factory) else index
    work.train(x)
    return faiss.index_gpu_to_cpu(work) if work is not index else index


def add_vectors(index: faiss.Index, vectors: np.ndarray, gpu: bool = False,
                factory: str = "", start: int | None = None) -> faiss.Index:
    """Append ``vectors``; IVF ids are ``start, start+1, ...`` (default: ``ntotal``), so a
    chunk keeps its row numbers whichever index part it lands in.  Returns a CPU index."""
    x = as_f32(vectors)
    if x.shape[1] != index.d:
        raise ValueError(f"vectors have dimension {x.shape[1]}, the index {index.d}")
    if gpu and gpu_supported(factory) and start is None:
        work = to_gpu(index)
        work.add(x)
        return faiss.index_gpu_to_cpu(work)
    if start is not None and ivf_of(index) is not None:
        index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    else:
        index.add(x)
    return index


def as_f32(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def set_threads(n: int) -> None:
    """FAISS's OpenMP threads in this process (a Ray task gets one core)."""
    faiss.omp_set_num_threads(n)


def limit_scratch(nbytes: int) -> None:
    """Cap FAISS's brute-force distance blocks (queries x database x 4 bytes; 16 MiB by
    default, k-means and IVF assignment use them) at about ``nbytes``."""
    db = int(faiss.cvar.distance_compute_blas_database_bs)
    faiss.cvar.distance_compute_blas_query_bs = int(min(4096, max(256, nbytes // (4 * db))))


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def empty_like(index: faiss.Index) -> faiss.Index:
    """A copy of a trained index without its vectors (the same quantizer and codec)."""
    ivf = ivf_of(index)
    if ivf is None:
        raise ValueError("only IVF indexes can be emptied and refilled")
    lists, own, ntotal = ivf.invlists, ivf.own_invlists, index.ntotal
    ivf.own_invlists = False  # or replace_invlists would free the lists we put back
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        return deserialize(serialize(index))
    finally:
        ivf.replace_invlists(lists, own)
        index.ntotal = ivf.ntotal = ntotal


# ------------------------------------------------------------------------------- GPU

def use_gpu(device: str = "auto") -> bool:
    """Whether to put indexes on a GPU: ``auto`` when FAISS has GPU support and a GPU."""
    if device == "cpu":
        return False
    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device.startswith("cuda") and not has:
        raise InputError(f"device {device!r} asked for, but FAISS sees no GPU "
                         "(faiss-cpu installed, or no CUDA device)")
    return has


_GPU_RESOURCES: Any = None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` (float16 storage off: results match the CPU index)."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = False
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index, opts)


def gpu_supported(factory: str) -> bool:
    """FAISS GPU implements flat, IVF-Flat/SQ/PQ; HNSW and OPQ pre-transforms stay on CPU."""
    return "HNSW" not in factory and "OPQ" not in factory


def is_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__


# ------------------------------------------------------------------ search parameters

def search_params(index: faiss.Index) -> dict[str, int]:
    """The tunable search parameters of ``index`` and their current values."""
    ivf = ivf_of(index)
    if ivf is not None:
        return {"nprobe": int(ivf.nprobe)}
    hnsw = _hnsw(index)
    if hnsw is not None:
        return {"efSearch": int(hnsw.hnsw.efSearch)}
    return {}


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply recorded ``nprobe``/``efSearch`` (also to GPU and pre-transformed indexes)."""
    for name, value in params.items():
        if name == "nprobe":
            ivf = ivf_of(index)
            if ivf is not None:
                ivf.nprobe = int(value)
            else:  # GPU IVF indexes are not IndexIVF subclasses
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(value))
        elif name == "efSearch":
            hnsw = _hnsw(index)
            if hnsw is not None:
                hnsw.hnsw.efSearch = int(value)
        else:
            raise ValueError(f"unknown search parameter {name!r}")


def _hnsw(index: faiss.Index) -> Any:
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) \
        else faiss.downcast_index(index)
    return base if isinstance(base, faiss.IndexHNSW) else None


# ------------------------------------------------------------------------ save / load

def save_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` atomically (a uniquely named temporary file, then a rename)."""
    with atomic_path(Path(path)) as tmp:
        write_index(index, tmp)


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def load_index(path: Path, mmap: bool = True, params: dict[str, int] | None = None,
               gpu: bool = False, factory: str = "", lists: Path | None = None) -> faiss.Index:
    """Open an index file, memory-mapped and read-only when ``mmap``.

    mmap makes opening cost no copy of the vectors (flat codes and inverted lists are
    paged in on first touch), so a large index opens at once.  A mapped index must never
    be added to: FAISS aborts the process.  HNSW graphs are always read into memory.
    ``lists``: the file of on-disk inverted lists (:mod:`.ondisk`), always mapped.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"index file {path} is missing")
    if lists is not None:
        # Skip FAISS's own open of the lists (it would take the name recorded at write
        # time, relative to the working directory) and map the file we were given.
        index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA
                                 | faiss.IO_FLAG_READ_ONLY)
        invlists = faiss.downcast_InvertedLists(ivf_of(index).invlists)
        invlists.filename = str(lists)
        if invlists.totsize:
            invlists.do_mmap()
    else:
        flags = 0
        if mmap:
            # The two flags cannot be combined: IVF lists map through IO_FLAG_MMAP, flat
            # codes (Flat, the storage of HNSW) through IO_FLAG_MMAP_IFC.
            flags = (faiss.IO_FLAG_MMAP if "IVF" in factory else faiss.IO_FLAG_MMAP_IFC) \
                | faiss.IO_FLAG_READ_ONLY
        index = faiss.read_index(str(path), flags)
    if gpu and gpu_supported(factory) and lists is None:
        index = to_gpu(index)
    if params:
        set_search_params(index, params)
    return index


def open_for_add(path: Path, lists: Path | None = None) -> faiss.Index:
    """An index read into memory to be added to; with on-disk ``lists``, its header only
    (the lists are read back with plain reads when merging, see :mod:`.ondisk`)."""
    return faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA if lists else 0)


def faiss_version() -> str:
    return str(faiss.__version__)


def release_pages(index: faiss.Index) -> None:
    """Unmap the resident pages of on-disk lists (they stay in the page cache), so a long
    search over them, like tuning, does not grow the process by the whole file."""
    ivf = ivf_of(index)
    if ivf is None:
        return
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(invlists, faiss.OnDiskInvertedLists) or invlists.ptr is None:
        return
    addr = int(invlists.ptr)
    start = addr - addr % _mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(start, int(invlists.totsize) + addr - start, MADV_DONTNEED)


def trim_memory() -> None:
    """Hand freed heap memory back to the system between build phases (glibc keeps it
    otherwise, and the next phase's peak would stack on the last one's)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def index_bytes(index: faiss.Index) -> int:
    """Size of the index in its serialised form (what it holds in memory, about)."""
    return int(faiss.serialize_index(index).nbytes)


def list_sizes(index: faiss.Index) -> np.ndarray:
    """Vectors per inverted list (empty for an index without lists)."""
    ivf = ivf_of(index)
    if ivf is None:
        return np.zeros(0, dtype=np.int64)
    lists = ivf.invlists
    return np.array([lists.list_size(j) for j in range(ivf.nlist)], dtype=np.int64)


def list_ids(index: faiss.Index, j: int) -> np.ndarray:
    """The ids of inverted list ``j``, in stored order."""
    lists = ivf_of(index).invlists
    n = lists.list_size(j)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return faiss.rev_swig_ptr(lists.get_ids(j), n).copy()


def list_codes(index: faiss.Index, j: int) -> np.ndarray:
    """The codes of inverted list ``j`` as bytes ``(n, code_size)``, in stored order."""
    ivf = ivf_of(index)
    n = ivf.invlists.list_size(j)
    cs = ivf.code_size
    if n == 0:
        return np.zeros((0, cs), dtype=np.uint8)
    return faiss.rev_swig_ptr(ivf.invlists.get_codes(j), n * cs).copy().reshape(n, cs)
