"""Adapters as replicas fetch them: named by their content, pulled from the artifact store by
the replica itself, verified, cached locally within bounds.

A gateway hands a vLLM replica a *name*, never a path of its own machine:

    <storage prefix>@<content digest>

The digest is the sha256 of the version's file list as the registry recorded it (every
file's relative path, sha256 and size, canonical JSON). The replica (serving/vllm_plugin.py,
inside vLLM) lists the prefix in the bucket, downloads every file, hashes what it got and
loads it only if the digest of what it downloaded equals the one in the name. So:
- a replica needs only the storage URL and read credentials (no database, no shared disk);
- bytes altered in the bucket are never loaded: they no longer match the name the registry
  vouched for;
- a name can never stand for other weights. vLLM keys its LoRA slots and prefix cache by
  name; new weights (a re-trained version) mean a new digest, so a new name, so no stale slot
  or cached prefix can answer for them.

This module imports neither vllm nor torch nor the database layer: the gateway uses it to
name adapters, the replica's plugin to fetch them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from api.storage import ArtifactStore, StorageError

log = logging.getLogger(__name__)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
REQUIRED = (CONFIG, WEIGHTS)
# In a cache entry whose weights carry their LoRA scaling (FoldScaling); not a store file.
FOLDED_MARK = ".loraplex-folded"
# The replica plugin's route that fetches, verifies and loads an adapter ahead of a request.
LOAD_PATH = "/loraplex/v1/load_adapter"
INFO_PATH = "/loraplex/v1/info"  # GET: {"lora_op": "grouped" | "vllm"} (vllm_plugin.py)
# Set by the launcher in every replica it starts (serving/replicas.py): the plugin's
# replica-only behaviour (vllm_plugin.py) stays off in vLLM processes Loraplex did not start.
REPLICA_ENV = "LORAPLEX_REPLICA"
_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9._\-/]{1,400})@(?P<digest>[0-9a-f]{64})$")


class AdapterRefused(Exception):
    """A replica will not load this adapter; `reason` is a short machine-readable word."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def content_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 of a version's file list: {relative path: {"sha256", "size"}}."""
    listing = sorted((rel, str(f["sha256"]), int(f["size"])) for rel, f in files.items())
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def replica_name(*, storage_prefix: str, files: Mapping[str, Mapping[str, Any]]) -> str:
    """The name a replica loads a version under (see the module docstring)."""
    return f"{storage_prefix.strip('/')}@{content_digest(files)}"


def parse_replica_name(name: str) -> tuple[str, str] | None:
    """(storage prefix, digest) of a Loraplex adapter name; None for any other name."""
    match = _NAME.match(name)
    if match is None:
        return None
    prefix = match["prefix"].strip("/")
    if not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        return None
    return prefix, match["digest"]


class ReplicaAdapterStore:
    """A replica's own adapter cache: `fetch(name)` gives a verified local directory.

    Entries live in `<root>/<digest>`, read-only; with `fold`, the LoRA scaling folded into
    lora_B where that is exact (FoldScaling below): vLLM then loads them without rewriting
    B. Each fetch or reuse touches the entry; past
    `max_adapters` or `max_bytes`, least recently used entries go, but never the `keep`
    most recent (vLLM may read a loaded adapter's files again when it pages one back in, and
    a replica holds at most about `--max-cpu-loras` of them).
    """

    def __init__(
        self,
        store: ArtifactStore,
        root: Path,
        *,
        max_adapters: int = 256,
        max_bytes: int = 20 << 30,
        keep: int = 16,
        fold: bool = False,
    ) -> None:
        self.store = store
        self.fold = fold
        self.root = root
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        # Entries verified by this process: one left by an earlier run is hashed again first
        # (fetched again, if its scaling was folded).
        self._verified: set[str] = set()

    def _still_intact(self, target: Path) -> bool:
        if (target / FOLDED_MARK).exists():
            # Its weights were rewritten here (scaling folded in): nothing to hash them
            # against but the store's bytes.
            log.info("replica adapter cache: %s was folded by an earlier run; fetching it "
                     "again", target.name[:12])  # fmt: skip
            return False
        present = files_in(target)
        if any(p.is_symlink() for p in present):
            intact = False
        else:
            files = {p.relative_to(target).as_posix(): {"sha256": sha256_of(p),
                                                        "size": p.stat().st_size}
                     for p in present}  # fmt: skip
            intact = content_digest(files) == target.name
        if not intact:
            log.warning("replica adapter cache: %s was altered on disk; fetching it again",
                        target.name[:12])  # fmt: skip
        return intact

    def fetch(self, name: str) -> Path:
        parsed = parse_replica_name(name)
        if parsed is None:
            raise AdapterRefused(f"{name!r} is not a Loraplex adapter name", reason="unknown")
        prefix, digest = parsed
        target = self.root / digest
        with self._lock:
            lock = self._fetching.setdefault(digest, threading.Lock())
        with lock:  # concurrent first requests for one adapter download it once
            if target.is_dir() and (digest in self._verified or self._still_intact(target)):
                self._verified.add(digest)
                _touch(target)
                return target
            self._download(prefix, digest, target)
            self._verified.add(digest)
        self.prune()
        return target

    def _download(self, prefix: str, digest: str, target: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=self.root))
        try:
            folds: list[FoldScaling] = []

            def rewrite(rel: str, local: Path) -> FoldScaling | None:
                fold = planned_fold(rel, local)
                if fold is not None:
                    folds.append(fold)
                return fold

            try:
                got = self.store.get_dir(prefix, tmp, rewrite=rewrite if self.fold else None)
            except (FileNotFoundError, StorageError, OSError) as e:
                raise _unreadable(prefix, e) from e
            missing = [f for f in REQUIRED if f not in got]
            if missing:
                raise AdapterRefused(
                    f"{prefix} is incomplete in the artifact store (missing {', '.join(missing)})",
                    reason="incomplete",
                )
            files = {rel: {"sha256": sha, "size": (tmp / rel).stat().st_size}
                     for rel, sha in got.items()}  # fmt: skip
            actual = content_digest(files)
            if actual != digest:
                raise AdapterRefused(
                    f"the bytes under {prefix} are not the version the registry recorded "
                    f"(content digest {actual[:12]}..., expected {digest[:12]}...): altered "
                    "or replaced in the artifact store; refusing to load them",
                    reason="altered",
                )
            if folds:
                self._finish_fold(folds[0], prefix, tmp, got)
            for path in files_in(tmp):
                path.chmod(0o444)
            tmp.chmod(0o755)
            replace_dir(target, tmp)
            log.info("fetched and verified adapter %s (%d files)", prefix, len(files))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _finish_fold(self, fold: FoldScaling, prefix: str, tmp: Path, got: dict[str, str]) -> None:
        """The weights came down with their scaling folded in: say so in the config vLLM
        reads (scaling 1), or, where a tensor could not be folded exactly, fetch the
        weights again as they are."""
        if fold.failed or not fold.done:
            weights = tmp / WEIGHTS
            weights.unlink()
            try:
                digest = self.store.get_file(f"{prefix}/{WEIGHTS}", weights)
            except (FileNotFoundError, StorageError, OSError) as e:
                raise _unreadable(prefix, e) from e
            if digest != got[WEIGHTS]:
                raise AdapterRefused(f"{prefix} changed in the artifact store while being "
                                     "fetched", reason="altered")  # fmt: skip
            log.info("adapter %s: LoRA scaling not folded (%s)", prefix, fold.why)
            return
        config_path = tmp / CONFIG
        config = json.loads(config_path.read_text())
        config |= {"lora_alpha": config["r"], "use_rslora": False}
        config_path.unlink()  # a new file: the downloaded one's bytes stay as they were
        config_path.write_text(json.dumps(config))
        (tmp / FOLDED_MARK).write_text(json.dumps({"scale": fold.scale}))

    def prune(self) -> list[str]:
        """Delete least recently used entries past the bounds; returns their digests."""
        with self._lock:
            entries = sorted(
                (p for p in self.root.glob("*") if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: p.stat().st_mtime,
                reverse=True,  # most recent first
            )
            sizes = [dir_size(p) for p in entries]
            count, total = len(entries), sum(sizes)
            evicted = []
            for path, size in reversed(list(zip(entries, sizes, strict=True))[self.keep :]):
                if count <= self.max_adapters and total <= self.max_bytes:
                    break
                shutil.rmtree(path, ignore_errors=True)
                self._verified.discard(path.name)
                count, total = count - 1, total - size
                evicted.append(path.name)
        for digest in evicted:
            log.info("replica adapter cache: evicted %s (least recently used)", digest[:12])
        return evicted


def _unreadable(prefix: str, error: Exception) -> AdapterRefused:
    return AdapterRefused(
        f"cannot read {prefix} from the artifact store ({type(error).__name__}: {error})",
        reason="unreadable",
    )


def replace_dir(target: Path, fresh: Path) -> None:
    """Put `fresh` at `target`; an old copy there is moved aside first, then deleted, so the
    path is never half-written."""
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        fresh.rename(target)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in files_in(directory)) if directory.is_dir() else 0


def files_in(directory: Path) -> list[Path]:
    """Every file under `directory` (symbolic links included, to be refused)."""
    return [p for p in directory.rglob("*") if p.is_file() or p.is_symlink()]


# Folding the LoRA scaling on the way in -------------------------------------------------
#
# vLLM multiplies every lora_B by the adapter's scaling (lora_alpha / r) when it loads one,
# in place, on tensors that are copy-on-write pages of the mmapped file: every page of B is
# copied, ~34 of the ~50 ms a load takes on a 2-vCPU box (docs/benchmarks.md). Written to
# the replica's cache already multiplied, with lora_alpha = r in the config, the adapter
# loads with scaling 1 and vLLM writes nothing. Only for a power of two above 1 (alpha = 2r,
# the usual choice): the product is then exact in every float format, so vLLM computes the
# same weights either way, whatever dtype it serves them in.

FOLDABLE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_HEADER = 100 << 20


def fold_scale(config: Any) -> float | None:
    """The scaling to fold into lora_B for this adapter config, or None (not foldable)."""
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        return None
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        return None
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        return None  # per-module scaling, or not an adapter vLLM loads
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    mantissa, exponent = math.frexp(scale)
    return scale if mantissa == 0.5 and exponent > 1 else None  # 2, 4, 8, ...


def planned_fold(rel: str, local: Path) -> FoldScaling | None:
    """For `ArtifactStore.get_dir`: the weights file gets folded when the config, fetched
    before it (name order), says how."""
    if rel != WEIGHTS or not (local / CONFIG).is_file() or sys.byteorder != "little":
        return None  # (safetensors is little-endian, as the tensors folded in memory here)
    try:
        scale = fold_scale(json.loads((local / CONFIG).read_text()))
    except (ValueError, OSError):
        return None
    return FoldScaling(scale) if scale is not None else None


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or "lora_embedding_B" in name


class FoldScaling:
    """A safetensors file, streamed: every LoRA B tensor comes out multiplied by `scale`,
    every other byte as it came. `failed` (and `why`) where the file is not one it can fold
    exactly: from then on bytes pass through unchanged, and the caller fetches it again."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.pending = bytearray()
        self.offset = 0  # file offset of pending[0]
        self.ranges: list[tuple[int, int, str]] | None = None  # B tensors: start, end, dtype
        self.failed = False
        self.why = ""

    @property
    def done(self) -> bool:
        return self.ranges == [] and not self.pending

    def _fail(self, why: str) -> None:
        self.failed, self.why, self.ranges = True, why, []

    def _parse_header(self) -> bool:
        if len(self.pending) < 8:
            return False
        size = int.from_bytes(self.pending[:8], "little")
        if size > MAX_HEADER:
            self._fail("header too large")
            return True
        if len(self.pending) < 8 + size:
            return False
        try:
            header = json.loads(bytes(self.pending[8 : 8 + size]))
            ranges = []
            for name, info in header.items():
                if name == "__metadata__" or not _is_lora_b(name):
                    continue
                dtype = FOLDABLE_DTYPES.get(info["dtype"])
                if dtype is None:
                    self._fail(f"{name} is {info['dtype']}")
                    return True
                begin, end = (int(x) for x in info["data_offsets"])
                if not 0 <= begin <= end:
                    self._fail(f"{name} has offsets {begin}..{end}")
                    return True
                ranges.append((8 + size + begin, 8 + size + end, dtype))
        except (ValueError, KeyError, TypeError, AttributeError):
            self._fail("not a safetensors file")
            return True
        self.ranges = sorted(ranges)
        if not self.ranges:
            self._fail("no LoRA B tensor")
        return True

    def feed(self, chunk: bytes) -> bytes:
        self.pending += chunk
        if self.ranges is None and not self._parse_header():
            return b""
        out = bytearray()
        assert self.ranges is not None
        while self.ranges:
            start, end, dtype = self.ranges[0]
            if start < self.offset:
                self._fail("overlapping tensors")
                break
            if self.offset < start:  # bytes before the next B tensor: as they are
                n = min(start - self.offset, len(self.pending))
                if n == 0:
                    return bytes(out)
                out += self.pending[:n]
                del self.pending[:n]
                self.offset += n
                continue
            if len(self.pending) < end - start:
                return bytes(out)  # the rest of this tensor is still to come
            self.ranges.pop(0)
            out += self._folded(self.pending[: end - start], dtype)  # may fail: ranges = []
            del self.pending[: end - start]
            self.offset = end
        out += self.pending
        self.offset += len(self.pending)
        self.pending.clear()
        return bytes(out)

    def _folded(self, data: bytearray, dtype: str) -> bytes:
        import torch  # replicas run in vLLM, which has it

        torch_dtype = getattr(torch, dtype)
        if not data:
            return bytes(data)
        if len(data) % torch_dtype.itemsize:
            self._fail("a tensor's size is not whole elements")
            return bytes(data)
        weights = torch.frombuffer(data, dtype=torch_dtype)
        folded = weights * self.scale
        if not bool(torch.isfinite(folded).all()):
            self._fail("a weight is not finite once scaled")
            return bytes(data)
        return folded.view(torch.uint8).numpy().tobytes()  # (numpy has no bfloat16)

    def finish(self) -> bytes:
        if self.ranges:
            self._fail("the file ended inside a tensor")
        rest = bytes(self.pending)
        self.pending.clear()
        return rest
