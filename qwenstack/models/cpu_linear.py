"""Linears for CPU decode: the native kernel for a few rows, or weights prepacked in oneDNN's layout.

Decoding is bound by reading the weights once per step, and on CPU `F.linear` on bfloat16 reads them well
below the memory bandwidth for a matrix-vector product. Two faster forms, and the runner picks, on the
model's own largest matrices and this machine, whichever multiplies one row and a batch of BATCH_ROWS rows
fastest in most of several interleaved timing rounds (measure, then pick; see FORM_ROUNDS); stacked MoE
experts, which see a few rows each, are voted on apart (EXPERT_ROWS):
- native: bfloat16 matrices whose sizes are tile multiples (16 rows, 32 columns: every Qwen3 linear) are
  stored tile-packed and multiplied by qwenstack/kernels/linear_tiled_cpu.cpp up to tiled_max_rows() rows
  (decode and batched decode: 512 with AMX or AVX512-BF16), by F.linear on the unpacked matrix
  above. Other matrices keep their plain weights (qwenstack/kernels/linear_cpu.cpp up to NATIVE_MAX_ROWS
  rows: AVX512-BF16 dot products for one or two rows, AMX tiles above, weight rows prefetched: 19 to 21
  GB/s here on the 0.6B shape, the bandwidth a streaming sum reaches; F.linear's GEMM above). Nothing is copied: a tied lm_head
  and the embedding share one tile-packed table (TiledEmbedding gathers lookups from its blocks), or the
  row-major embedding matrix where the table does not tile.
- packed: each matrix reordered once by oneDNN (`mkldnn._reorder_linear_weight`, what torch.compile's CPU
  freezing does), bit-identical to F.linear; about 12 GB/s here at one row, and oneDNN's fastest GEMM for
  many rows. The unpacked weight is freed (memory does not double); a tied lm_head gets its own packed copy
  of the embedding (the embedding still serves lookups). The packed weights are opaque, so packing is the
  last step of preparing a model.
Quantized modules are left alone either way (they have their own kernels).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack import kernels

log = logging.getLogger("qwenstack.models")
# Above this many rows, F.linear's GEMM beats the native kernel here (bfloat16, 0.6B shape: the kernel is
# 25% faster than prepacked oneDNN at 1 row, equal at 16, slower from 24).
NATIVE_MAX_ROWS = 16


def _rows_through(kernel: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None, max_rows: int) -> torch.Tensor | None:
    """kernel(x as [rows, in]) shaped back like x, plus bias; None when x has no rows or more than max_rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > max_rows or rows == 0:
        return None
    y = kernel(x.reshape(rows, x.shape[-1])).view(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the native kernel when x has at most NATIVE_MAX_ROWS rows."""
    y = _rows_through(lambda rows: kernels.linear_rows(rows, weight), x, weight.shape[0], bias, NATIVE_MAX_ROWS)
    return F.linear(x, weight, bias) if y is None else y


class NativeLinear(nn.Module):
    """An nn.Linear whose few-row products go to the native kernel; shares the weight it is given."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, native"


# Up to this many rows the tile-packed kernel runs in one call (and up to twice as many in pieces); above
# (long prefill chunks), F.linear on the matrix unpacked for the call. Four 0.6B layers' matrices, 2 threads,
# medians: the kernel takes 0.75-0.8 of F.linear's time at 32-64 rows, 0.85-0.95 at 128, about the same at
# 256, 1.1-1.2 from 512 (oneDNN's GEMM is better tuned for large products), where unpacking (int32 moves at
# ~7 GB/s) costs F.linear as much. Unpacking is no option for short prompts: it reads and writes every matrix
# once per forward.
TILED_MAX_ROWS = 512


@functools.cache
def tiled_max_rows() -> int:
    """Up to how many rows TiledLinear runs the tiled kernel in this build (AMX or vector loops only)."""
    # Without AMX, the vector loops' limit (kernels.vector_loop_max_rows: 512 with AVX512-BF16, 16 below it;
    # it was 16 for all while the loops' accumulators spilled to the stack, at half today's speed).
    return TILED_MAX_ROWS if kernels.has_amx() else kernels.vector_loop_max_rows()


def tiled_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) for W in the tile-packed layout: the tiled kernel up to tiled_max_rows() rows, in
    pieces of that many up to twice as many, and F.linear on the matrix unpacked for the call above.
    The pieces: a 293-token prompt (Qwen3-VL-2B's text and one 512x512 image) unpacked every matrix for
    each call, which cost more than the products (2048 x 6144 at 293 rows, 2 AVX512-BF16 threads: 26.4 ms
    against 18.2 in two kernel calls; oneDNN's packed form 16.5). From 1,024 rows the two ways take the
    same time here."""
    max_rows = tiled_max_rows()
    if x.dim() == 2 and 0 < x.shape[0] <= max_rows:  # what the model's layers pass: no reshapes
        y = kernels.linear_tiled(x, packed)
        return y if bias is None else y + bias
    out_features = packed.shape[0] * kernels.TILE_N
    y = _rows_through(lambda rows: _tiled_pieces(rows, packed, max_rows), x, out_features, bias, 2 * max_rows)
    return F.linear(x, kernels.unpack_tiles(packed), bias) if y is None else y


def _tiled_pieces(x: torch.Tensor, packed: torch.Tensor, max_rows: int) -> torch.Tensor:
    """kernels.linear_tiled on x [rows, in] in pieces of at most max_rows rows (each row's sums are the same
    whatever the rows beside it)."""
    if x.shape[0] <= max_rows:
        return kernels.linear_tiled(x, packed)
    return torch.cat([kernels.linear_tiled(piece, packed) for piece in x.split(max_rows)])


class TiledLinear(nn.Module):
    """An nn.Linear whose bfloat16 weight is stored once, in the tile-packed layout of the native kernel
    (kernels.pack_tiles): one kernel for 1 to TILED_MAX_ROWS rows (vector dot products for one or two, AMX
    tiles above), where the row-major weight ran our kernel up to 16 rows and F.linear's slower GEMM from 17
    (batched decode: 63 ms against 84 for all 28 0.6B layers at 64 rows). The `packed` parameter holds the
    same elements as the weight it replaces."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, packed: nn.Parameter | None = None) -> None:
        """From a weight [N, K], or from an already packed parameter (shared with a TiledEmbedding)."""
        super().__init__()
        if packed is None:
            packed = nn.Parameter(kernels.pack_tiles(weight), requires_grad=False)
        self.out_features, self.in_features = packed.shape[0] * kernels.TILE_N, packed.shape[1] * kernels.TILE_K
        self.packed = packed
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tile-packed"


class TiledEmbedding(nn.Module):
    """An embedding table stored tile-packed, so that a tied lm_head (a TiledLinear on the same parameter)
    multiplies by it in the tiled kernel: one copy of the largest matrix of small models. Lookups gather
    each row's column pairs from its blocks (kernels.tiled_rows): a token's row is 1/16 of 64-byte lines, a
    few microseconds per step. On the 0.6B shape the lm_head took 18.9 ms tiled against 22.6 row-major at
    one row, and 23 against 35 (F.linear) at 16-32 rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.packed = nn.Parameter(kernels.pack_tiles(weight), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # As nn.Embedding: an id outside the table is an error (a negative one would index from the end).
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.num_embeddings):
            raise IndexError(f"token id outside the embedding table (0..{self.num_embeddings - 1})")
        return kernels.tiled_rows(self.packed, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tile-packed"


def packing_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype here: bfloat16 wherever packing exists, float16 only on CPUs
    with AVX512-FP16 (elsewhere the reorder raises), found by packing a small matrix once."""
    if dtype not in (torch.bfloat16, torch.float16) or not packing_supported():
        return False
    try:
        pack_weight(torch.zeros(16, 32, dtype=dtype))
    except RuntimeError:
        return False
    return True


def prepares(dtype: torch.dtype) -> bool:
    """Whether a model of this dtype gets a CPU form other than plain F.linear: bfloat16 (the native kernel or
    packing), float16 where oneDNN packs it; float32 keeps nn.Linear."""
    return dtype == torch.bfloat16 or packs(dtype)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str = "none", algorithm: str = "") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, activation, [], algorithm)


class PackedLinear(nn.Module):
    """F.linear on a oneDNN-packed weight; `activation` ("gelu" with algorithm "tanh" or "none", "relu", ...)
    is fused into the GEMM as a oneDNN post-op, applied to the float32 sums before the output is rounded."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str = "none",
                 algorithm: str = "") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = pack_weight(weight)  # opaque oneDNN tensor: a plain attribute, not a parameter
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.activation, self.algorithm = activation, algorithm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias, self.activation, self.algorithm)

    def extra_repr(self) -> str:
        fused = "" if self.activation == "none" else f", then {self.activation} {self.algorithm}".rstrip()
        return f"in_features={self.in_features}, out_features={self.out_features}, packed{fused}"


# The form is chosen by timing matrix-vector products, which on a machine shared with other work can be
# slowed by a burst of load at any moment: one timing of each form, taken one form after the other, picked
# plain F.linear for a whole benchmark run (2x slower decode) while another process was busy. So every form
# is timed in each of several rounds, one after another in a rotated order, and the form that wins the
# most rounds is taken (the best time per form breaks ties): a burst costs at most the rounds it overlaps.
# The rounds run on one thread: with two threads on a busy 2-core machine every form waited on its
# preempted second thread (30-60 ms a pass, no form ahead in the votes), while one thread kept the forms
# apart in every try (the tiled kernel 7.5-8 ms against 11-18 ms for F.linear and oneDNN, 6 rounds of 7).
# The forms differ in how they read a matrix, which a single thread shows as well as two.
FORM_ROUNDS = 7
# The probe products read this many bytes of the model's largest matrices per pass, more than a last-level
# cache holds: decode streams its weights from memory, and a form's speed on a matrix that stays in cache
# between repeats is not its speed there.
PROBE_BYTES = 64 * 2**20


def probe_weights(model: nn.Module, budget: int = PROBE_BYTES) -> list[torch.Tensor]:
    """The weights of the model's largest nn.Linear modules, largest first, until they hold `budget` bytes."""
    linears = sorted((m for m in model.modules() if type(m) is nn.Linear), key=lambda m: -m.weight.numel())
    probes: list[torch.Tensor] = []
    total = 0
    for m in linears:
        if total >= budget:
            break
        probes.append(m.weight.detach())
        total += m.weight.numel() * m.weight.element_size()
    return probes


# Each pass multiplies every probe weight by one row (a single stream's decode step) and by this many (a
# batch): the forms rank differently by rows. On 2 AVX512-BF16 cores without AMX, four 0.6B matrices took
# 0.79 ms in the tiled kernel against 0.98 in oneDNN's packed form at one row, and 3.79 against 1.49 at 16
# (the tiled kernel has no tile unit there, and its vector loop takes two rows a pass); one-row passes alone
# let the tiled kernel win the votes on that machine and lose 1.5-2.5x on every batch.
BATCH_ROWS = 16
# Stacked MoE experts see few rows in a decode step: B sequences give each expert about B x top_k / E of
# them (32 sequences of a 128-expert, top-10 model: 2.5; the released 512-expert Qwen3-Next: 0.6). Their
# form is voted on apart, by running their mix as the model would (models/moe.py: in the native form, every
# expert in one call) on one row and on this many an expert. With the dense linears' vote they
# took oneDNN's packed form on a CPU without AMX, where the one call runs a 32-sequence Qwen3-Next step 1.19x
# faster.
EXPERT_ROWS = 4


def _is_experts(module: nn.Module) -> bool:
    """Stacked MoE experts (models/moe.py's Experts and its quantized kind), known by their grouped SwiGLU:
    not imported, since models/moe.py builds on this module."""
    return callable(getattr(module, "grouped_swiglu", None))


def _expert_stacks(model: nn.Module) -> list[nn.Module]:
    """The model's stacked experts whose weights are plain [E, N, K] stacks (not quantized, not prepared)."""
    return [m for m in model.modules() if _is_experts(m)
            and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3]


def _expert_passes(model: nn.Module, budget: int = PROBE_BYTES) -> dict[str, Callable[[], object]]:
    """One pass per available form over copies of the first experts of the model's first expert stack (as
    many as hold `budget` bytes): their mix on one row and on EXPERT_ROWS rows each; none when the
    model has no (unquantized, 16-bit) stacked experts."""
    stack = next(iter(_expert_stacks(model)), None)
    if stack is None or not prepares(stack.gate_up_proj.dtype):
        return {}
    per_expert = (stack.gate_up_proj[0].numel() + stack.down_proj[0].numel()) * stack.gate_up_proj.element_size()
    n = max(1, min(stack.num_experts, -(-budget // per_expert)))
    forms = ["plain"] + ["packed"] * packing_supported() + ["native"] * kernels.linear_rows_available()
    passes = {}
    for form in forms:
        probe = type(stack)(n, stack.hidden_size, stack.intermediate_size).to(stack.gate_up_proj.dtype)
        with torch.no_grad():
            probe.gate_up_proj.copy_(stack.gate_up_proj[:n])
            probe.down_proj.copy_(stack.down_proj[:n])
        if form != "plain":
            probe.prepare_for_cpu(form)
        calls = []
        for rows in (1, EXPERT_ROWS):  # n * rows tokens, each routed to one expert at weight 1
            x = torch.randn(n * rows, stack.hidden_size, dtype=stack.gate_up_proj.dtype)
            calls.append(functools.partial(probe.mix, x, torch.arange(n * rows), torch.ones(n * rows, dtype=x.dtype),
                                           torch.full((n,), rows, dtype=torch.long)))
        passes[form] = functools.partial(lambda calls: [c() for c in calls], calls)
    return passes


def _form_passes(weights: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """One pass per available form: a one-row and a BATCH_ROWS-row product with every probe weight, in the
    layout the form would give it (the native form tile-packs what tiles, as prepare_cpu_linears does)."""
    xs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights for rows in (1, BATCH_ROWS)]
    ws = [w for w in weights for _ in (1, BATCH_ROWS)]

    def each(products: list[Callable[[], object]]) -> Callable[[], object]:
        return lambda: [p() for p in products]

    passes = {"plain": each([functools.partial(F.linear, x, w) for x, w in zip(xs, ws)])}
    if packing_supported():
        packed = {id(w): pack_weight(w) for w in weights}
        passes["packed"] = each([functools.partial(packed_linear, x, packed[id(w)]) for x, w in zip(xs, ws)])
    if all(w.dtype in kernels.LINEAR_WEIGHT_DTYPES for w in weights) and kernels.linear_rows_available():
        tiled = {id(w): kernels.pack_tiles(w) for w in weights if kernels.can_tile(w)}
        passes["native"] = each([
            functools.partial(tiled_linear, x, tiled[id(w)]) if id(w) in tiled
            else functools.partial(native_linear, x, w)
            for x, w in zip(xs, ws)
        ])
    return passes


@dataclass
class FormTiming:
    """What fastest_form measured: per form, the rounds it won and its best pass time (seconds)."""

    wins: dict[str, int]
    best: dict[str, float]

    @property
    def chosen(self) -> str:
        return max(self.wins, key=lambda f: (self.wins[f], -self.best[f]))


def time_forms(weights: list[torch.Tensor], rounds: int = FORM_ROUNDS) -> FormTiming:
    """Times one-row and BATCH_ROWS-row products in each available form over `weights`, all forms once per
    round, each round in a rotated order."""
    return time_passes(_form_passes(weights), rounds)


def time_passes(passes: dict[str, Callable[[], object]], rounds: int = FORM_ROUNDS) -> FormTiming:
    """Times each form's pass once per round, each round in a rotated order, on one thread."""
    forms = list(passes)
    timing = FormTiming(dict.fromkeys(forms, 0), dict.fromkeys(forms, float("inf")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for fn in passes.values():
                fn()  # warm-up: first-call allocations, kernel dispatch
            for r in range(rounds):
                times = {}
                for form in forms[r % len(forms):] + forms[:r % len(forms)]:
                    t = time.perf_counter()
                    passes[form]()
                    times[form] = time.perf_counter() - t
                    timing.best[form] = min(timing.best[form], times[form])
                timing.wins[min(times, key=times.__getitem__)] += 1
    finally:
        torch.set_num_threads(threads)
    return timing


def fastest_form(weights: list[torch.Tensor], rounds: int = FORM_ROUNDS) -> str:
    """The CPU linear form ("plain" F.linear, "packed" oneDNN or "native") that multiplies one row and a
    batch of rows fastest on this machine: the winner of most of `rounds` interleaved rounds over `weights`."""
    return _chosen("CPU linear forms", time_forms(weights, rounds))


def fastest_expert_form(model: nn.Module, rounds: int = FORM_ROUNDS) -> str | None:
    """The form in which the model's stacked experts run their decode rows fastest here (see EXPERT_ROWS);
    None when it has none."""
    passes = _expert_passes(model)
    return _chosen("CPU forms of the experts", time_passes(passes, rounds)) if passes else None


def _chosen(what: str, timing: FormTiming) -> str:
    log.info("%s: rounds won %s, best ms %s", what, timing.wins, {f: round(t * 1e3, 2) for f, t in timing.best.items()})
    return timing.chosen


def _runnable(form: str) -> str:
    """`form`, or "plain" where this machine cannot run it."""
    if form == "packed" and not packing_supported() or form == "native" and not kernels.linear_rows_available():
        return "plain"
    return form


def prepare_cpu_linears(model: nn.Module, form: str | None = None) -> int:
    """Puts the model's linears in the fastest CPU form here ("native", "packed" or "plain"; `form` forces
    one); returns how many matrices changed form."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or not prepares(params[0].dtype):
        return 0
    probes = probe_weights(model)
    if not probes:
        return 0
    expert_form = form
    if form is None:
        form = fastest_form(probes)
        expert_form = fastest_expert_form(model) or form
    form, expert_form = _runnable(form), _runnable(expert_form)
    if form == "plain" and expert_form == "plain":
        log.info("F.linear is the fastest CPU linear on this machine; keeping it")
        return 0
    wrap = PackedLinear if form == "packed" else NativeLinear
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and form != "plain":
                # Native form: a bfloat16 matrix of tile multiples is stored tile-packed (freeing the
                # row-major one); others keep their weight for the row-major kernel.
                tiled = form == "native" and kernels.can_tile(child.weight)
                setattr(module, child_name, (TiledLinear if tiled else wrap)(child.weight, child.bias))
                count += 1
            elif _is_experts(child):  # stacked MoE experts (models/moe.py) pick their own layout
                count += child.prepare_for_cpu(expert_form) if expert_form != "plain" else 0
            elif hasattr(child, "prepare_for_cpu") and form != "plain":  # e.g. the vision tower's blocks
                count += child.prepare_for_cpu(form)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if getattr(model, "lm_head", 0) is None and isinstance(embed, nn.Embedding) and form != "plain":
        if form == "native" and kernels.can_tile(embed.weight):
            table = TiledEmbedding(embed.weight)
            inner.embed_tokens = table  # type: ignore[union-attr]
            model.lm_head = TiledLinear(embed.weight, packed=table.packed)  # type: ignore[assignment]
        else:
            model.lm_head = wrap(embed.weight)  # type: ignore[assignment]
        count += 1
    log.info("%d CPU linears in the %s form (stacked experts: %s)", count, form, expert_form)
    return count
