"""The grouped LoRA op's C kernel for decode-sized batches (vLLM's CPU build).

On a decode step the grouped op's torch path costs ~20 small torch ops per module; with 16
rows over 8 adapters that dispatch (and the thread pool waking for each op) costs more than the
arithmetic: about 650 us per SmolLM2 layer on 2 threads, where the weights' bytes bound it near
300. `lora_kernel.c` does a whole module (every output slice) in one call, in parallel on the
OpenMP pool torch already runs (bench/lora_op_cpu.py measures both).

The source ships with the package and is compiled on first use on the host that runs it
(`cc -O3 -march=native -fopenmp`, well under a second), cached under
$XDG_CACHE_HOME/loraplex/ (else ~/.cache/loraplex/, else the temp dir) by a hash of the
source, flags, compiler and CPU. Where no C compiler is found or the build fails, `load()`
says why and returns None: the op then keeps its torch path, which gives the same results.
LORAPLEX_LORA_KERNEL=off in a replica's environment turns the kernel off.

The activations are float32 (the replica's dtype); the LoRA weights float32, or float16 /
bfloat16 where the replica keeps them so (`serving_lora_dtype`, vLLM's `--lora-dtype`): half
the bytes, which is what bounds a decode step over many distinct adapters. Anything else
(`Kernel.add` returns False), and batches of more than MAX_ROWS LoRA rows (a long prefill's
rows are better served by torch's matrix multiplies), the caller runs its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.lora_groups import TransposedB

log = logging.getLogger("loraplex.replica")
ENV = "LORAPLEX_LORA_KERNEL"
SOURCE = Path(__file__).with_name("lora_kernel.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
MAX_ROWS = 128  # LoRA rows per batch; measured: the kernel wins up to ~128 on 2 threads
MAX_RANK = 64  # as lora_kernel.c
SYMBOL = "loraplex_lora_rows_f32"

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
# Weight dtypes the kernel reads (lora_kernel.c's W_*), the activations being float32.
WEIGHT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class Rows:
    """A batch's LoRA rows sorted by slot, and (slot, start, count) per slot present, as
    int64 tensors the kernel reads (built once per batch mapping, shared by every layer)."""

    __slots__ = ("groups", "lo", "rows", "span")

    def __init__(self, index: torch.Tensor) -> None:
        index = index.to(torch.int64)  # the kernel reads int64
        order = torch.argsort(index, stable=True)
        skip = int((index < 0).sum())  # -1 sorts first
        self.rows = order[skip:].contiguous()
        slots, counts = torch.unique_consecutive(index[self.rows], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        self.groups = torch.stack([slots, starts, counts], 1).contiguous()
        self.lo = int(slots[0]) if slots.numel() else 0
        self.span = int(slots[-1]) + 1 - self.lo if slots.numel() else 0

    @classmethod
    def of(cls, index: torch.Tensor) -> Rows | None:
        """Rows for the kernel, or None where the batch has none or too many LoRA rows."""
        n = int((index >= 0).sum())
        return cls(index) if 0 < n <= MAX_ROWS else None


class _Plan:
    """One module's arguments for the kernel, built on its first call and kept: vLLM
    allocates its stacked weights once, so their addresses (and those of the transposed B
    copies) do not move. `ok` False: the module's weights are not what the kernel takes."""

    __slots__ = ("a_ptrs", "a_strides", "b_ptrs", "b_slot_strides", "b_strides", "keep",
                 "offsets", "ok", "rank", "sizes", "width", "wtype")  # fmt: skip

    def __init__(self, parts: Sequence[Part], transposed: TransposedB) -> None:
        self.keep = [t for a, b, _, _ in parts for t in (a, b)]  # what the key's ids are of
        self.ok = all(_takes(a, b) for a, b, _, _ in parts)
        if not self.ok:
            return
        a_list = [_slots_view(a) for a, _, _, _ in parts if a is not None]
        bt_list = [transposed.fresh(b, 0, 0) for _, b, _, _ in parts]
        self.rank, self.width = a_list[0].size(1), a_list[0].size(2)
        self.wtype = WEIGHT_TYPES[a_list[0].dtype]
        self.ok = self.rank <= MAX_RANK and all(
            a.size(1) == self.rank and a.size(2) == self.width and bt.size(1) == self.rank
            and a.dtype == bt.dtype == a_list[0].dtype
            and bt.is_contiguous() and size <= bt.size(2)
            for a, bt, (_, _, _, size) in zip(a_list, bt_list, parts, strict=True)
        )  # fmt: skip
        n = len(parts)
        self.keep += bt_list
        self.a_ptrs = (_I64 * n)(*(t.data_ptr() for t in a_list))
        self.a_strides = (_I64 * n)(*(t.stride(0) for t in a_list))
        self.b_ptrs = (_I64 * n)(*(t.data_ptr() for t in bt_list))
        self.b_slot_strides = (_I64 * n)(*(t.stride(0) for t in bt_list))
        self.b_strides = (_I64 * n)(*(t.stride(1) for t in bt_list))
        self.offsets = (_I64 * n)(*(off for _, _, off, _ in parts))
        self.sizes = (_I64 * n)(*(size for _, _, _, size in parts))


Part = tuple[torch.Tensor | None, torch.Tensor, int, int]


class Kernel:
    """The loaded kernel. `add` is one module's LoRA delta for every LoRA row."""

    def __init__(self, lib: ctypes.CDLL, path: Path, *, shared_pool: bool) -> None:
        self.path = path
        self.shared_pool = shared_pool
        fn = getattr(lib, SYMBOL)
        fn.argtypes = [_I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR,
                       _PTR, _PTR, _PTR, _PTR, _I64, ctypes.c_float, ctypes.c_int,
                       ctypes.c_int]  # fmt: skip
        fn.restype = ctypes.c_int
        self._fn = fn
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self.batches = 0  # module calls the kernel did (the first one is logged)

    def add(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        rows: Rows,
        parts: Sequence[Part],
        scale: float,
        transposed: TransposedB,
    ) -> bool:
        """y[r, off:off+size] += ((x[r] @ A.T) * scale) @ B.T for each LoRA row r and part
        (A, B, off, size) of its slot. False (nothing done) where the inputs are not what the
        kernel is built for; the caller then runs its torch path."""
        tensors = [t for a, b, _, _ in parts for t in (a, b)]
        key = tuple(id(t) for t in tensors)
        plan = self._plans.get(key)
        if plan is None or any(k is not t for k, t in zip(plan.keep, tensors, strict=False)):
            plan = self._plans[key] = _Plan(parts, transposed)
        if not plan.ok or not _fits(y, x, plan.width, parts):
            return False
        if transposed.stale:
            for _, b, _, _ in parts:
                transposed.fresh(b, rows.lo, rows.span)
        threads = torch.get_num_threads() if self.shared_pool else 1
        rc = self._fn(rows.groups.size(0), rows.groups.data_ptr(), rows.rows.data_ptr(),
                      x.data_ptr(), x.stride(0), plan.width, y.data_ptr(), y.stride(0),
                      len(parts), plan.a_ptrs, plan.a_strides, plan.b_ptrs,
                      plan.b_slot_strides, plan.b_strides, plan.offsets, plan.sizes, plan.rank,
                      scale, threads, plan.wtype)  # fmt: skip
        if rc != 0:
            return False
        if self.batches == 0:
            log.info("loraplex: LoRA kernel ran its first batch (%d LoRA rows, %d thread(s))",
                     rows.rows.numel(), threads)  # fmt: skip
        self.batches += 1
        return True


def _slots_view(stacked: torch.Tensor) -> torch.Tensor:
    """(slots, 1, out, in) or (slots, out, in) as (slots, out, in): a view."""
    return stacked.squeeze(1) if stacked.dim() == 4 else stacked


def _takes(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Weights the kernel reads: A and B of one of WEIGHT_TYPES, A contiguous, stacked as
    vLLM stacks them."""
    return (a is not None and a.dtype in WEIGHT_TYPES and b.dtype == a.dtype
            and a.is_contiguous() and a.dim() in (3, 4) and b.dim() in (3, 4))  # fmt: skip


def _fits(y: torch.Tensor, x: torch.Tensor, width: int, parts: Sequence[Part]) -> bool:
    """Activations the kernel reads: float32 rows, contiguous within a row, every slice in y."""
    return (y.dtype == torch.float32 and x.dtype == torch.float32 and y.dim() == 2
            and x.dim() == 2 and y.stride(1) == 1 and x.stride(1) == 1 and x.size(1) == width
            and x.size(0) == y.size(0) and parts[-1][2] + parts[-1][3] <= y.size(1))  # fmt: skip


def cache_dir() -> Path:
    """Where compiled kernels are kept: the first writable of $XDG_CACHE_HOME/loraplex,
    ~/.cache/loraplex and the temp dir's loraplex-kernels."""
    candidates = []
    if os.environ.get("XDG_CACHE_HOME"):
        candidates.append(Path(os.environ["XDG_CACHE_HOME"]) / "loraplex")
    candidates.append(Path.home() / ".cache" / "loraplex")
    candidates.append(Path(tempfile.gettempdir()) / "loraplex-kernels")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    raise OSError("no writable cache directory for the LoRA kernel")


def _cpu_id() -> str:
    try:
        flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith(("flags", "model name"))][:2]  # fmt: skip
    except OSError:
        flags = []
    return platform.machine() + "\n" + "\n".join(flags)


def compile_kernel(cc: str, out_dir: Path) -> Path:
    """The kernel's shared library for this host, built unless already cached."""
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    target = out_dir / f"lora_kernel-{digest}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".lora_kernel-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: replicas starting together may both build it
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _openmp_runtimes() -> set[str]:
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps if any(n in line.rsplit("/", 1)[-1] for n in names)}


def load() -> tuple[Kernel | None, str]:
    """The kernel for this host, or None and why not (the op then runs its torch path)."""
    if os.environ.get(ENV, "").lower() in ("off", "0", "false", "no"):
        return None, f"{ENV}={os.environ[ENV]}"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc or gcc) on PATH"
    try:
        path = compile_kernel(cc, cache_dir())
        before = _openmp_runtimes()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"the kernel did not build or load: {exc}"
    # Loaded after torch, the kernel's libgomp.so.1 is torch's own (one thread pool). Were
    # a second OpenMP runtime pulled in, two pools would fight over the CPUs: run one thread.
    shared = len(_openmp_runtimes()) <= max(1, len(before))
    return Kernel(lib, path, shared_pool=shared), str(path)
