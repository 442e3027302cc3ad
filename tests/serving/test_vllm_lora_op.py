"""The grouped LoRA op (serving/vllm_lora_op.py) against vLLM 0.32's own CPU punica wrapper,
driven the way vLLM's LoRA layers drive it: a real LoRAMapping through update_metadata, then
add_lora_linear / add_shrink+add_expand / add_lora_logits on stacked weights shaped as vLLM
stacks them (slots, 1, rank, in) and (slots, 1, out, rank), every slot filled with a distinct
adapter of its own rank (zero-padded to the max, as vLLM loads them).

Adapter rows must equal a float64 reference (and vLLM's op); base rows (index -1) must be the
base output bit for bit. vLLM's own op fails that last check in a mixed batch: it gives them
the last slot's delta (`w[-1]`), which is why base rows go through the zero adapter there."""

from __future__ import annotations

import importlib.util

import pytest

from tests.serving.test_lora_kernel import _reference as reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")

SLOTS, MAX_RANK = 5, 16
RANKS = [16, 8, 4, 16, 1]
IN, OUT_SLICES = 48, (40, 24, 24)  # a qkv-like module: three output slices
VOCAB = 60


@pytest.fixture(params=["kernel", "torch"], autouse=True)
def op_path(request):
    """Every test runs with the C kernel (decode-sized batches) and with the torch path only
    (a replica without a C compiler)."""
    from serving import lora_kernel, vllm_lora_op

    loaded = None
    if request.param == "kernel":
        loaded, detail = lora_kernel.load()
        assert loaded is not None, detail
    saved = list(vllm_lora_op._KERNEL)
    vllm_lora_op._KERNEL[:] = [loaded]
    yield request.param
    vllm_lora_op._KERNEL[:] = saved


def _stack(gen, fan_in: int, out: int):
    import torch

    a = torch.zeros(SLOTS, 1, MAX_RANK, fan_in)
    b = torch.zeros(SLOTS, 1, out, MAX_RANK)
    for slot, rank in enumerate(RANKS):
        a[slot, 0, :rank] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        b[slot, 0, :, :rank] = torch.randn(out, rank, generator=gen) * 0.1
    return a, b


def _wrappers(index: list[int], sampled: list[int], *, prefill: bool):
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from serving.vllm_lora_op import GroupedPunicaWrapperCPU

    ids = [10 + slot for slot in range(SLOTS)]  # slot -> adapter id; id 0 is "no adapter"
    mapping = LoRAMapping(
        index_mapping=tuple(0 if s < 0 else ids[s] for s in index),
        prompt_mapping=tuple(0 if s < 0 else ids[s] for s in sampled),
        is_prefill=prefill,
    )
    out = []
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        wrapper = cls(max_num_batched_tokens=256, max_batches=64, device="cpu")
        wrapper.update_metadata(mapping, list(ids), SLOTS, VOCAB)
        out.append(wrapper)
    return out


def _reference(x, base, stacks, index):
    """float64, row by row: base + x A^T B^T of the row's slot, per output slice."""
    return reference(x, base, stacks, index, 1.0)


BATCHES = {
    # slot per token, prefill or not, and the path the op takes: "bmm" (blocks padded per
    # slot, two batched matmuls), "runs" (consecutive runs as views), "sorted" (rows
    # gathered by slot), None (no LoRA row)
    "decode, base rows between adapters": ([2, -1, 0, 4, -1, 1, 3, 0, -1, 2, 4, 1], False, "bmm"),
    "prefill runs": ([1] * 7 + [-1] * 5 + [3] * 4 + [4] * 6, True, "bmm"),
    "no base rows": ([0, 1, 2, 3, 4, 0, 1, 2], False, "bmm"),
    "one adapter": ([3] * 9, False, "bmm"),
    "long prefill beside decodes": ([0] * 20 + [1, 2, -1, 3, 4, 1], True, "runs"),
    "long prefill, interleaved decodes": (
        [0] * 12 + [1, 2, 1, 2, 1, 2, -1, 1, 2, 1, 2, 3],
        True,
        "sorted",
    ),
    "all base": ([-1] * 6, False, None),
}


@pytest.mark.parametrize("batch", list(BATCHES))
def test_grouped_op_matches_the_reference_and_leaves_base_rows_alone(
    batch: str, op_path: str
) -> None:
    import torch

    from serving.lora_groups import Groups

    index, prefill, path = BATCHES[batch]
    groups = Groups(torch.tensor(index))
    taken = ("bmm" if groups.padded else "runs" if groups.rows is None else "sorted") if (
        groups.segments) else None  # fmt: skip
    assert taken == path
    gen = torch.Generator().manual_seed(7)
    stacks = [_stack(gen, IN, out) for out in OUT_SLICES]
    x = torch.randn(len(index), IN, generator=gen)
    base = torch.randn(len(index), sum(OUT_SLICES), generator=gen)
    expected = _reference(x, base, stacks, index)
    stock, grouped = _wrappers(index, index, prefill=prefill)
    plain = torch.tensor([s < 0 for s in index])
    lora_rows = ~plain
    a_stacked = tuple(a for a, _ in stacks)
    b_stacked = tuple(b for _, b in stacks)

    results = {}
    for name, wrapper in (("stock", stock), ("grouped", grouped)):
        y = base.clone()
        wrapper.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, OUT_SLICES)
        results[name] = y
    if op_path == "kernel":
        assert grouped.kernel is not None and grouped.kernel.batches == (1 if path else 0)
    else:
        assert grouped.kernel is None
    # The split path vLLM's sharded layers take: shrink into buffers, then expand.
    split = base.clone()
    buffers = tuple(torch.zeros(len(index), MAX_RANK) for _ in OUT_SLICES)
    grouped.add_shrink(buffers, x, a_stacked, 1.0)
    grouped.add_expand(split, buffers, b_stacked, OUT_SLICES, offset_start=0, add_inputs=True)
    results["grouped split"] = split

    for name in ("grouped", "grouped split"):
        y = results[name]
        assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5), name
        assert torch.equal(y[plain], base[plain]), f"{name}: base rows changed"
    assert torch.allclose(results["stock"][lora_rows], results["grouped"][lora_rows], 1e-5, 1e-5)
    if plain.any() and lora_rows.any():
        # vLLM's own op in a mixed batch: base rows get the last slot's LoRA delta.
        assert not torch.allclose(results["stock"][plain], base[plain], atol=1e-3)
        last = _reference(x[plain], base[plain], stacks, [SLOTS - 1] * int(plain.sum()))
        assert torch.allclose(results["stock"][plain].double(), last, rtol=1e-5, atol=1e-5)


def test_grouped_logits_use_the_sampled_rows_mapping() -> None:
    import torch

    tokens = [0] * 4 + [-1] * 3 + [2] * 5 + [4] * 2  # a prefill of three requests and a decode
    sampled = [0, -1, 2, 4]  # one sampled row per request
    gen = torch.Generator().manual_seed(3)
    a, b = _stack(gen, IN, VOCAB + 4)  # the LoRA vocabulary padded past the logits'
    x = torch.randn(len(sampled), IN, generator=gen)
    logits = torch.randn(len(sampled), VOCAB, generator=gen)
    stock, grouped = _wrappers(tokens, sampled, prefill=True)
    got = logits.clone()
    grouped.add_lora_logits(got, x, a, b, 1.0)
    want = logits.double().clone()
    for t, slot in enumerate(sampled):
        if slot >= 0:
            want[t] += ((x[t].double() @ a[slot, 0].double().t()) @ b[slot, 0].double().t())[:VOCAB]
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], logits[1])  # the base request's logits untouched
    theirs = logits.clone()
    stock.add_lora_logits(theirs, x, a, b, 1.0)
    assert torch.allclose(theirs[[0, 2, 3]], got[[0, 2, 3]], 1e-5, 1e-5)


def test_a_slot_given_another_adapter_is_read_afresh() -> None:
    """The op keeps B in a faster layout; vLLM rewrites a slot's weights in place when it puts
    another adapter there and then sends the new slot layout: the next forward must use the
    new weights (and, not told, it would not: the copy is really what it reads)."""
    import torch
    from vllm.lora.layers.utils import LoRAMapping

    index = [2, -1, 0, 4, 1, 3, 2, 0]  # a decode step: the padded, batched path
    gen = torch.Generator().manual_seed(11)
    stacks = [_stack(gen, IN, out) for out in OUT_SLICES]
    a_stacked = tuple(a for a, _ in stacks)
    b_stacked = tuple(b for _, b in stacks)
    x = torch.randn(len(index), IN, generator=gen)
    base = torch.randn(len(index), sum(OUT_SLICES), generator=gen)
    _, grouped = _wrappers(index, index, prefill=False)

    def run():
        y = base.clone()
        grouped.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, OUT_SLICES)
        return y

    assert torch.allclose(run().double(), _reference(x, base, stacks, index), 1e-5, 1e-5)
    for a, b in stacks:  # another adapter into slot 2, in place, as set_lora writes it
        a[2, 0].copy_(torch.randn(MAX_RANK, IN, generator=gen) / IN**0.5)
        b[2, 0].copy_(torch.randn(b.size(2), MAX_RANK, generator=gen) * 0.1)
    fresh = _reference(x, base, stacks, index)
    assert not torch.allclose(run().double(), fresh, 1e-5, 1e-5)  # not told: the old copy
    ids = [10 + slot for slot in range(SLOTS)]
    ids[2] = 99
    mapping = LoRAMapping(index_mapping=tuple(0 if s < 0 else ids[s] for s in index),
                          prompt_mapping=tuple(0 if s < 0 else ids[s] for s in index),
                          is_prefill=False)  # fmt: skip
    grouped.update_metadata(mapping, ids, SLOTS, VOCAB)
    y = run()
    assert torch.allclose(y.double(), fresh, 1e-5, 1e-5)
    plain = torch.tensor([s < 0 for s in index])
    assert torch.equal(y[plain], base[plain])


def test_logits_untouched_when_no_adapter_in_the_batch_trains_lm_head() -> None:
    import torch

    sampled = [0, -1, 2, 4]
    gen = torch.Generator().manual_seed(5)
    a, b = _stack(gen, IN, VOCAB)
    a.zero_()  # what vLLM's reset_lora leaves for adapters without lm_head weights
    b.zero_()
    x = torch.randn(len(sampled), IN, generator=gen)
    logits = torch.randn(len(sampled), VOCAB, generator=gen)
    _, grouped = _wrappers(sampled, sampled, prefill=False)
    got = logits.clone()
    grouped.add_lora_logits(got, x, a, b, 1.0)
    assert torch.equal(got, logits)
    a[4, 0, :2] = torch.randn(2, IN, generator=gen)  # one adapter in the batch trains it
    b[4, 0, :, :2] = torch.randn(VOCAB, 2, generator=gen)
    grouped.add_lora_logits(got, x, a, b, 1.0)
    want = logits[3].double() + (x[3].double() @ a[4, 0].double().t()) @ b[4, 0].double().t()
    assert torch.allclose(got[3].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:3], logits[:3])


def test_install_swaps_only_the_cpu_wrapper_of_the_supported_vllm() -> None:
    from vllm.platforms import current_platform

    from serving import vllm_lora_op

    platform = type(current_platform)
    stock = platform.__dict__["get_punica_wrapper"]
    try:
        vllm_lora_op.install()
        assert current_platform.get_punica_wrapper() == vllm_lora_op.QUALNAME
        vllm_lora_op.install()  # twice (the plugin loads in every vLLM process): no error
    finally:
        platform.get_punica_wrapper = stock
    assert current_platform.get_punica_wrapper() == vllm_lora_op.STOCK_QUALNAME
