"""The grouped op's C kernel (serving/lora_kernel.c, .py): built on this host by its C
compiler, cached, and exact against a float64 reference; base rows never touched. Where it
cannot help (no compiler, weights it was not built for) the op keeps its torch path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from serving import lora_kernel
from serving.lora_groups import Groups, TransposedB, lora_rows

SLOTS, MAX_RANK = 6, 16
RANKS = [16, 8, 4, 16, 1, 12]


@pytest.fixture(scope="module")
def kernel() -> lora_kernel.Kernel:
    loaded, detail = lora_kernel.load()
    assert loaded is not None, detail  # this machine has a C compiler: the kernel must build
    return loaded


def _stacks(gen: torch.Generator, fan_in: int, outs: tuple[int, ...], rank: int = MAX_RANK):
    """Per output slice, A (slots, 1, rank, in) and B (slots, 1, out, rank) as vLLM stacks
    them: each slot its own adapter, zero-padded to the max rank."""
    stacks = []
    for out in outs:
        a = torch.zeros(SLOTS, 1, rank, fan_in)
        b = torch.zeros(SLOTS, 1, out, rank)
        for slot, r in enumerate(RANKS):
            r = min(r, rank)
            a[slot, 0, :r] = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
            b[slot, 0, :, :r] = torch.randn(out, r, generator=gen) * 0.1
        stacks.append((a, b))
    return stacks


def _parts(stacks):
    parts, offset = [], 0
    for a, b in stacks:
        parts.append((a, b, offset, b.size(2)))
        offset += b.size(2)
    return parts


def _reference(x, base, stacks, index, scale):
    y = base.double().clone()
    for t, slot in enumerate(index):
        if slot < 0:
            continue
        offset = 0
        for a, b in stacks:
            d = ((x[t].double() @ a[slot, 0].double().t()) * scale) @ b[slot, 0].double().t()
            y[t, offset : offset + d.numel()] += d
            offset += d.numel()
    return y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "index",
    [
        [2, -1, 0, 4, -1, 1, 3, 0, -1, 2, 5, 1],  # a decode step, base rows between
        [3] * 21 + [-1] * 3,  # one adapter over several chunks of rows
        [(7 * i) % SLOTS if i % 5 else -1 for i in range(lora_kernel.MAX_ROWS)],  # the most rows
    ],
    ids=["decode", "one adapter", "most rows"],
)
def test_kernel_matches_the_reference_and_leaves_base_rows_alone(
    kernel: lora_kernel.Kernel, index: list[int], threads: int
) -> None:
    gen = torch.Generator().manual_seed(3)
    stacks = _stacks(gen, 40, (24, 8, 8))
    x = torch.randn(len(index), 40, generator=gen)
    base = torch.randn(len(index), 48, generator=gen)  # 8 columns past the slices
    groups = Groups(torch.tensor(index))
    rows = groups.kernel_rows()
    assert rows is not None
    narrow = lora_kernel.Rows(torch.tensor(index, dtype=torch.int32))  # read as int64 anyway
    assert torch.equal(narrow.rows, rows.rows) and torch.equal(narrow.groups, rows.groups)
    assert rows.groups.dtype == narrow.groups.dtype == torch.int64
    before = kernel.batches
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = base.clone()
        assert kernel.add(y, x, rows, _parts(stacks), 0.5, TransposedB())
    finally:
        torch.set_num_threads(old)
    assert kernel.batches == before + 1
    expected = _reference(x, base[:, :40], stacks, index, 0.5)
    assert torch.allclose(y[:, :40].double(), expected, 1e-5, 1e-5)
    plain = torch.tensor(index) < 0
    assert torch.equal(y[plain], base[plain])
    # The columns past the module's slices (a wider output buffer) are not written either.
    assert torch.equal(y[:, 40:], base[:, 40:])


def test_lora_rows_takes_the_kernel_where_it_fits_and_torch_elsewhere(
    kernel: lora_kernel.Kernel,
) -> None:
    gen = torch.Generator().manual_seed(4)
    index = [1, 0, -1, 2, 1, 5]
    x = torch.randn(len(index), 32, generator=gen)
    base = torch.randn(len(index), 16, generator=gen)
    groups = Groups(torch.tensor(index))

    def run(stacks, x, base, with_kernel: bool = True) -> torch.Tensor:
        y = base.clone()
        lora_rows(y, x, groups, _parts(stacks), 1.0, TransposedB(), kernel if with_kernel else None)
        return y

    cases = {
        "float32, rank 16": (_stacks(gen, 32, (16,)), x, base, True),
        "rank 64, its largest": (_stacks(gen, 32, (16,), rank=64), x, base, True),
        "rank 80": (_stacks(gen, 32, (16,), rank=80), x, base, False),
    }
    # LoRA weights kept in half precision (--lora-dtype) beside float32 activations: the
    # kernel reads them as they are, the arithmetic stays float32.
    for dtype in (torch.float16, torch.bfloat16):
        half = [(a.to(dtype), b.to(dtype)) for a, b in _stacks(gen, 32, (16,))]
        cases[f"{dtype} weights"] = (half, x, base, True)
    low = [(a.bfloat16(), b.bfloat16()) for a, b in _stacks(gen, 32, (16,))]
    cases["bfloat16 activations"] = (low, x.bfloat16(), base.bfloat16(), False)
    for name, (stacks, xs, ys, through_kernel) in cases.items():
        before = kernel.batches
        y = run(stacks, xs, ys)
        assert (kernel.batches > before) == through_kernel, name
        expected = _reference(xs.float(), ys.float(), [(a.float(), b.float()) for a, b in stacks],
                              index, 1.0)  # fmt: skip
        tol = 1e-5 if xs.dtype == torch.float32 else 5e-2
        assert torch.allclose(y.double(), expected, tol, tol), name
        # The torch path (no compiler, or past MAX_ROWS) computes the same, also in float32.
        assert torch.allclose(run(stacks, xs, ys, with_kernel=False).double(), expected, tol, tol)
    many = Groups(torch.zeros(lora_kernel.MAX_ROWS + 1, dtype=torch.long))
    assert many.kernel_rows() is None  # a long prefill: torch's matmuls do better


def test_the_kernel_is_built_once_and_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first, where = lora_kernel.load()
    assert first is not None, where
    built = Path(where)
    assert built.parent == tmp_path / "loraplex" and built.exists()
    stamp = built.stat().st_mtime_ns
    second, again = lora_kernel.load()
    assert second is not None and again == where and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temp files left


def test_without_a_compiler_or_turned_off_the_op_keeps_its_torch_path(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    loaded, why = lora_kernel.load()
    assert loaded is None and "did not build" in why
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    os.chmod(broken, 0o755)
    monkeypatch.setenv("CC", str(broken))
    loaded, why = lora_kernel.load()
    assert loaded is None and "internal error" in why
    assert not list((tmp_path / "loraplex").iterdir())  # nothing half-written cached
    monkeypatch.delenv("CC")
    monkeypatch.setenv(lora_kernel.ENV, "off")
    loaded, why = lora_kernel.load()
    assert loaded is None and lora_kernel.ENV in why
