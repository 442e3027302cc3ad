"""Microbenchmark: vLLM CPU's LoRA op (per-token weight gather) vs grouping tokens by adapter.

Plain torch, no vLLM import. One SmolLM2-135M decoder layer's LoRA-wrapped linears as vLLM
builds them (hidden 576, intermediate 1536, 9 heads / 3 KV heads x 64; the bundled GGUF's
metadata): qkv_proj (3 slices), o_proj, gate_up_proj (2 slices), down_proj. LoRA weights are
stacked the way vLLM stacks them: per slice A (slots, 1, R, in) and B (slots, 1, out, R), each
adapter zero-padded to the max rank R. float32 throughout, as Loraplex's CPU replicas run.

Variants, measured side by side (interleaved rounds, median), per layer:
  base  the base matmuls alone (no LoRA);
  vllm  base + vLLM 0.32.0's CPU path, replicated: PunicaWrapperCPU.add_lora_linear /
        add_shrink / add_expand -> sgmv_* -> bgmv_* (vllm/lora/ops/torch_ops/lora_ops.py):
        repeat_interleave the per-run indices, gather every token's A and B (`w[indices]`),
        einsum. Index -1 ("no adapter") gathers the LAST slot: the mixed-batch bug;
  loop  base + the installed op (serving/lora_groups.py, the code the replicas run): where
        padding at most doubles the LoRA rows, blocks per slot and two bmm per module (as
        bmm below, B read from a contiguous transposed copy); otherwise one shrink/expand
        matmul pair per adapter present, on runs in
        place (prefill) or on rows sorted by slot with one index_add_ back. -1 rows are
        never touched;
  bmm   base + the same groups padded to the largest and run as two bmm per slice over the
        stacked weights' own storage (a narrow() view, no weight copy): the op count does
        not grow with the number of adapters (the bench's own version, before it went in);
  kern  base + the installed op with its C kernel (serving/lora_kernel.c): one call per
        module, every slice, rows grouped by slot, on torch's thread pool; batches of at
        most 128 LoRA rows (else the op runs `loop`).
"pick" is what the installed op runs: kern up to 128 LoRA rows where the kernel builds;
otherwise bmm unless padding would more than double the LoRA rows (one long prefill beside
decodes), then loop.
The x30-layer step, the lm_head and
attention are not modelled: the figures are per decoder layer.

Checks first (fp32; allclose against a float64 per-row reference): vllm, loop and bmm agree
on adapter rows; loop's and bmm's -1 rows equal the base output bit for bit; vllm's -1 rows
carry exactly the last slot's delta in a mixed batch (the bug, reproduced) and nothing when
every row is -1 (its no_lora shortcut). Takes ~10 s.

    .venv/bin/python bench/lora_op_cpu.py [--threads 1] [--rounds 9] [--cases 8x1 256x16 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import lora_kernel
from serving.lora_groups import Groups as RowGroups
from serving.lora_groups import TransposedB, lora_rows

HIDDEN, INTER, HEAD_DIM, HEADS, KV_HEADS = 576, 1536, 64, 9, 3  # 30 layers, vocab 49152
# (name, in features, output slices) of one Llama decoder layer under vLLM's LoRA layers.
MODULES = [
    ("qkv_proj", HIDDEN, (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)),
    ("o_proj", HEADS * HEAD_DIM, (HIDDEN,)),
    ("gate_up_proj", HIDDEN, (INTER, INTER)),
    ("down_proj", INTER, (HIDDEN,)),
]
MAX_RANK = 16  # --max-lora-rank 16
SLOTS = 9  # --max-loras 9 (bench_serving.py): 8 adapters in the batch + one resident, unused
RANKS = [16, 8, 16, 4, 16, 8, 1, 16, 16]  # per slot: mixed ranks, zero-padded to MAX_RANK
IN_BATCH = 8  # slots 0..7 get rows; slot 8 is loaded but has no rows this step


@dataclass
class Module:
    weight: torch.Tensor  # (sum(out_slices), in)
    lora_a: tuple[torch.Tensor, ...]  # per slice (SLOTS, 1, MAX_RANK, in)
    lora_b: tuple[torch.Tensor, ...]  # per slice (SLOTS, 1, out, MAX_RANK)
    out_slices: tuple[int, ...]


def make_layer(gen: torch.Generator) -> list[Module]:
    layer = []
    for _, fan_in, out_slices in MODULES:
        weight = torch.randn(sum(out_slices), fan_in, generator=gen) / fan_in**0.5
        lora_a, lora_b = [], []
        for out in out_slices:
            a = torch.zeros(SLOTS, 1, MAX_RANK, fan_in)
            b = torch.zeros(SLOTS, 1, out, MAX_RANK)
            for slot, rank in enumerate(RANKS):
                a[slot, 0, :rank] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
                # B scaled like a trained adapter's (alpha/r folded in, as vLLM does at load).
                b[slot, 0, :, :rank] = torch.randn(out, rank, generator=gen) * 0.05
            lora_a.append(a)
            lora_b.append(b)
        layer.append(Module(weight, tuple(lora_a), tuple(lora_b), out_slices))
    return layer


# (a) vLLM 0.32.0 CPU path, replicated --------------------------------------------------------


def vllm_meta(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """compute_meta (punica_wrapper/utils.py): runs of equal indices; once per step."""
    lora_indices, seq_lengths = torch.unique_consecutive(index, return_counts=True)
    no_lora = lora_indices.numel() == 1 and int(lora_indices.item()) == -1
    return lora_indices, seq_lengths, no_lora


def vllm_lora(y: torch.Tensor, x: torch.Tensor, m: Module, meta) -> None:
    """PunicaWrapperCPU.add_lora_linear with is_prefill=True (CPU always runs sgmv)."""
    lora_indices, seq_lengths, no_lora = meta
    buffers = [torch.zeros((x.size(0), MAX_RANK), dtype=torch.float32) for _ in m.out_slices]
    for s, a in enumerate(m.lora_a):  # add_shrink -> sgmv_shrink -> bgmv_shrink
        if no_lora:
            continue
        exploded = torch.repeat_interleave(lora_indices, seq_lengths)
        selected = a[exploded].to(dtype=buffers[s].dtype).squeeze(dim=1)
        out = torch.einsum("bi, boi -> bo", x.to(dtype=buffers[s].dtype), selected)
        buffers[s][:, : out.shape[1]] = 1.0 * out[:]
    offset = 0
    for s, b in enumerate(m.lora_b):  # add_expand -> sgmv_expand_slice -> bgmv_expand_slice
        size = m.out_slices[s]
        if not no_lora:
            exploded = torch.repeat_interleave(lora_indices, seq_lengths)
            selected = b[exploded].to(dtype=y.dtype).squeeze(dim=1)
            out = torch.einsum("bi, boi -> bo", buffers[s].to(dtype=y.dtype), selected)
            y[:, offset : offset + size] += out[:]
        offset += size


# (b) grouped by adapter --------------------------------------------------------------------


@dataclass
class Groups:
    """Per-step metadata (built once in update_metadata, shared by every layer)."""

    core: RowGroups  # the installed op's grouping (serving/lora_groups.py): runs or sorted
    # padded form, for the bmm variant: one group per slot in lo..lo+span-1 (the stacked
    # weights are then a view, never copied), each padded to `width` rows
    lo: int
    span: int
    gather: torch.Tensor  # (span * width,) rows; padding repeats a real row
    mask: torch.Tensor  # (span, width, 1): 1 for real rows, 0 for padding and absent slots
    width: int
    waste: float  # padded rows / LoRA rows: the bmm variant's extra work

    @property
    def use_bmm(self) -> bool:
        """What a bmm op would run this step: bmm unless padding doubles the work."""
        return self.waste <= 2.0


def grouped_meta(index: torch.Tensor) -> Groups:
    """Rows grouped by slot; -1 rows are left out (plain rows, no LoRA work at all)."""
    lora = index >= 0
    by_slot = torch.argsort(index, stable=True)[int((~lora).sum()) :]  # -1 sorts first
    counts = torch.bincount(index[lora], minlength=SLOTS)
    present = counts.nonzero().flatten().tolist()
    lo = present[0] if present else 0
    span = present[-1] + 1 - lo if present else 0
    width = int(counts.max()) if present else 0
    firsts = (torch.cumsum(counts, 0) - counts).tolist()
    gather = by_slot[:1].repeat(span * width)  # padding: a real row, masked
    mask = torch.zeros(span, width, 1)
    for slot in present:
        i, n, first = slot - lo, int(counts[slot]), firsts[slot]
        gather[i * width : i * width + n] = by_slot[first : first + n]
        mask[i, :n] = 1.0
    waste = span * width / max(1, by_slot.numel())
    return Groups(RowGroups(index), lo, span, gather, mask, width, waste)


# The installed op keeps B transposed for the batched path; the bench's weights never change.
TRANSPOSED = TransposedB()
KERNEL, KERNEL_WHERE = lora_kernel.load()


def grouped_lora(y: torch.Tensor, x: torch.Tensor, m: Module, g: Groups) -> None:
    """The installed op's fused path (serving.lora_groups.lora_rows), on this module."""
    parts, offset = [], 0
    for a, b, size in zip(m.lora_a, m.lora_b, m.out_slices, strict=True):
        parts.append((a, b, offset, size))
        offset += size
    lora_rows(y, x, g.core, parts, 1.0, TRANSPOSED)


def kernel_lora(y: torch.Tensor, x: torch.Tensor, m: Module, g: Groups) -> None:
    """The installed op with its C kernel (it falls back to `loop` past 128 LoRA rows)."""
    parts, offset = [], 0
    for a, b, size in zip(m.lora_a, m.lora_b, m.out_slices, strict=True):
        parts.append((a, b, offset, size))
        offset += size
    lora_rows(y, x, g.core, parts, 1.0, TRANSPOSED, KERNEL)


def bmm_lora(y: torch.Tensor, x: torch.Tensor, m: Module, g: Groups) -> None:
    if not g.core.segments:
        return
    n = g.span
    xg = x.index_select(0, g.gather).view(n, g.width, -1)
    delta = torch.empty(n, g.width, y.size(1), dtype=y.dtype)
    offset = 0
    for a, b, size in zip(m.lora_a, m.lora_b, m.out_slices, strict=True):
        at = a.narrow(0, g.lo, n).squeeze(1).transpose(1, 2)  # views of the stacked weights
        bt = b.narrow(0, g.lo, n).squeeze(1).transpose(1, 2)
        torch.bmm(torch.bmm(xg, at) * g.mask, bt, out=delta[:, :, offset : offset + size])
        offset += size
    y.index_add_(0, g.gather, delta.view(-1, y.size(1)))  # padding rows add exact zeros


def auto_lora(y: torch.Tensor, x: torch.Tensor, m: Module, g: Groups) -> None:
    (bmm_lora if g.use_bmm else grouped_lora)(y, x, m, g)


# Layer forward and reference ----------------------------------------------------------------


def layer_forward(xs: list[torch.Tensor], layer: list[Module], lora=None, meta=None):
    outs = []
    for x, m in zip(xs, layer, strict=True):
        y = F.linear(x, m.weight)
        if lora is not None:
            lora(y, x, m, meta)
        outs.append(y)
    return outs


def reference(xs: list[torch.Tensor], layer: list[Module], index: torch.Tensor):
    """float64, row by row: base + x A^T B^T for the row's slot; nothing for -1."""
    outs = []
    for x, m in zip(xs, layer, strict=True):
        x64 = x.double()
        y = x64 @ m.weight.double().t()
        for t, slot in enumerate(index.tolist()):
            if slot < 0:
                continue
            parts = [
                (x64[t] @ a[slot, 0].double().t()) @ b[slot, 0].double().t()
                for a, b in zip(m.lora_a, m.lora_b, strict=True)
            ]
            y[t] += torch.cat(parts)
        outs.append(y)
    return outs


def token_index(case: str, gen: torch.Generator) -> torch.Tensor:
    """A batch as vLLM lays it out: "TOKENSxPER" is requests of PER consecutive tokens (1: a
    decode step), spread evenly over the base model (-1) and the IN_BATCH adapters in random
    order; "A+B" concatenates batches (a prefill chunk beside decodes)."""
    parts = []
    for part in case.split("+"):
        tokens, per_request = (int(v) for v in part.split("x"))
        n_requests = -(-tokens // per_request)
        adapters = torch.randperm(IN_BATCH, generator=gen)
        cycle = adapters if n_requests == 1 else torch.cat([torch.tensor([-1]), adapters])
        choices = cycle.repeat(-(-n_requests // cycle.numel()))[:n_requests]
        choices = choices[torch.randperm(n_requests, generator=gen)]
        parts.append(torch.repeat_interleave(choices, per_request)[:tokens])
    return torch.cat(parts)


def check(layer: list[Module], gen: torch.Generator) -> None:
    cases = {
        "decode 40x1": token_index("40x1", gen),
        "decode 8x1": token_index("8x1", gen),
        "prefill 96x12": token_index("96x12", gen),
        "skewed 48x48+8x1": token_index("48x48+8x1", gen),
        "all base": torch.full((12,), -1),
        "no base rows": torch.arange(12) % IN_BATCH,
    }
    for name, index in cases.items():
        xs = [torch.randn(index.numel(), m.weight.size(1), generator=gen) for m in layer]
        base = layer_forward(xs, layer)
        ref = reference(xs, layer, index)
        got_v = layer_forward(xs, layer, vllm_lora, vllm_meta(index))
        groups = grouped_meta(index)
        got_g = layer_forward(xs, layer, grouped_lora, groups)
        got_b = layer_forward(xs, layer, bmm_lora, groups)
        got_k = layer_forward(xs, layer, kernel_lora, groups)
        plain = index < 0
        lora_rows = ~plain
        bug = 0.0
        for i, (mname, _, _) in enumerate(MODULES):
            for label, got in (("loop", got_g), ("bmm", got_b), ("kern", got_k)):
                assert torch.allclose(got[i].double(), ref[i], rtol=1e-4, atol=1e-5), (
                    name, mname, label)  # fmt: skip
                assert torch.equal(got[i][plain], base[i][plain]), (name, mname, label)
                assert torch.allclose(got[i][lora_rows], got_v[i][lora_rows], 1e-5, 1e-5)
            assert torch.allclose(got_v[i][lora_rows].double(), ref[i][lora_rows], 1e-4, 1e-5)
            if plain.all():  # vLLM skips the op when every row is -1 (no_lora)
                assert torch.equal(got_v[i], base[i]), (name, mname)
            elif plain.any():
                # vLLM's -1 rows in a mixed batch: exactly the last slot's delta (w[-1]).
                last = reference(
                    [xs[i][plain]], [layer[i]], torch.full((int(plain.sum()),), SLOTS - 1)
                )[0]
                assert torch.allclose(got_v[i][plain].double(), last, rtol=1e-4, atol=1e-5)
                bug = max(bug, (got_v[i][plain] - base[i][plain]).abs().max().item())
        print(
            f"check {name:17s} ok: loop, bmm, kern, vllm == fp64 reference on adapter rows; -1 "
            f"rows: loop, bmm, kern == base exactly; vllm's off by {bug:.3g} (last slot's delta)"
        )


# Timing ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def bench(layer: list[Module], case: str, rounds: int, gen: torch.Generator):
    index = token_index(case, gen)
    xs = [torch.randn(index.numel(), m.weight.size(1), generator=gen) for m in layer]
    groups = grouped_meta(index)
    variants: dict[str, Callable[[], object]] = {
        "base": lambda: layer_forward(xs, layer),
        "vllm": lambda: layer_forward(xs, layer, vllm_lora, vllm_meta(index)),
        "loop": lambda: layer_forward(xs, layer, grouped_lora, groups),
        "bmm": lambda: layer_forward(xs, layer, bmm_lora, groups),
        "kern": lambda: layer_forward(xs, layer, kernel_lora, groups),
    }
    # Index metadata is per step (shared by all 30 layers): timed on its own.
    meta_us = {
        "vllm": timed(lambda: vllm_meta(index), 50) * 1e6,
        "grouped": timed(lambda: grouped_meta(index), 50) * 1e6,
    }
    iters = {}
    for name, fn in variants.items():  # about 15 ms a sample
        fn()
        iters[name] = max(1, int(0.015 / max(timed(fn, 2), 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):  # interleaved, alternating order
        for name in list(variants) if r % 2 == 0 else list(reversed(variants)):
            samples[name].append(timed(variants[name], iters[name]))
    med = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    kernel = KERNEL is not None and groups.core.kernel_rows() is not None
    mode = "kern" if kernel else "bmm" if groups.use_bmm else "loop"
    med["pick"] = med[mode]
    info = {
        "adapters": len({slot for slot, _, _ in groups.core.segments}),
        "plain": int((index < 0).sum()),
        "mode": mode + ("/runs" if mode == "loop" and groups.core.rows is None else ""),
        "waste": groups.waste,
    }
    return med, meta_us, info


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["8x1", "16x1", "64x1", "256x1", "64x4", "256x16", "192x192+64x1"],
        help="TOKENSxPER_REQUEST[+...]: 8x1 is a decode step of 8 requests, 256x16 a prefill "
        "chunk of 16 requests of 16 tokens, 192x192+64x1 one long prefill beside 64 decodes",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layer = make_layer(gen)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32; one SmolLM2-135M "
        f"layer (qkv/o/gate_up/down), {SLOTS} slots, rank <= {MAX_RANK}, ranks {RANKS}"
    )
    print(f"C kernel: {KERNEL_WHERE}" if KERNEL else f"C kernel off ({KERNEL_WHERE}): kern = loop")
    check(layer, gen)
    print(
        "\nper layer, median of rounds, us (x30 layers = one step's linears); +% = LoRA "
        "overhead vs base;\npick = what the installed op runs (kern up to 128 LoRA rows, else bmm "
        "unless padding `waste` > 2x);"
        " meta = per-step index work, us"
    )
    header = (
        f"{'case':>12} {'ad':>2} {'-1':>3} {'pick':>9} {'waste':>5} | {'base':>6} {'vllm':>6} "
        f"{'loop':>6} {'bmm':>6} {'kern':>6} | {'vllm+':>6} {'loop+':>6} {'bmm+':>6} {'kern+':>6} "
        f"{'pick+':>6} | "
        f"{'pick/vllm':>9} | {'meta v':>6} {'meta g':>6}"
    )
    print(header)
    print("-" * len(header))
    for case in args.cases:
        med, meta, info = bench(layer, case, args.rounds, gen)
        over = {k: med[k] / med["base"] - 1 for k in ("vllm", "loop", "bmm", "kern", "pick")}
        print(
            f"{case:>12} {info['adapters']:>2} {info['plain']:>3} {info['mode']:>9} "
            f"{info['waste']:>5.1f} | {med['base']:>6.0f} {med['vllm']:>6.0f} {med['loop']:>6.0f}"
            f" {med['bmm']:>6.0f} {med['kern']:>6.0f} | {over['vllm']:>+6.0%} "
            f"{over['loop']:>+6.0%} {over['bmm']:>+6.0%} {over['kern']:>+6.0%} "
            f"{over['pick']:>+6.0%} | {med['pick'] / med['vllm']:>9.2f} | "
            f"{meta['vllm']:>6.0f} {meta['grouped']:>6.0f}"
        )


if __name__ == "__main__":
    main()
