"""``python -m bench.roofline``: a static cost model of the Triton kernels on H100 and H200, without a GPU.

For one shape (default N=8192, V=128256), every kernel that ``kernels/launch.py`` launches for a forward + backward
is compiled exactly as launched (``kernels/aot.py``) for sm_90a and disassembled, for a bf16 and a float32 student
(teacher of the same dtype; AKL also bf16 with a float32 teacher), with labels and with the CE term at T = 2
(``aot.Case`` label modes ``labels`` and ``ce_t2``). Launches that run the same binary (``aot.binary_key``) are
compiled once. The vocabulary loop of a kernel is the innermost SASS loop that loads from global memory.

**Ideal bound** (the model of issues 9 and 11). Per element of a row, from the loop:

- ``instr/elem`` = loop instructions x warps / E, ``mufu/elem`` = MUFU instructions x warps x 32 / E, where E, the
  elements one loop iteration covers, is ``BLOCK_V`` times the blocks it loads (bytes its global loads fetch over
  ``BLOCK_V`` x the streamed read bytes per element: the loop's unrolling, times ``BATCH`` for the stats pass's
  tiles of ``BATCH`` entries a lane);
- ``bytes/elem``: what the pass streams (``z``, ``t`` reads; the gradient write), from the launch's tensors.

A kernel's time is the largest of memory (bytes / bandwidth), issue (instructions / (SMs x 4 per clock)) and MUFU
(lane operations / (SMs x 16 per clock)), plus the instructions outside the loop once per program; every branch in
the loop is counted as taken. Full bandwidth at any occupancy: a lower bound, not an estimate.

**Occupancy-aware estimate** (issue 18, SPEC §6). Memory runs at full bandwidth only if each SM keeps
bandwidth x L / SMs bytes in flight (Little's law; L the DRAM latency under load, ``LATENCY_NS`` = 600 ns, with
the estimates at 450 and 800 ns beside it). Per kernel:

- resident blocks per SM B = the least of 64K registers / (warps x registers per warp; registers are allocated per
  warp in units of 256, i.e. per thread rounded up to 8), 64 warps / warps, 228 KB / (the cubin's static shared
  memory + Triton's dynamic shared memory + 1 KB reserved per block), 32 blocks, and the grid's programs per SM
  (the sm_90 limits of the CUDA occupancy calculator);
- bytes one iteration loads: E x the streamed read bytes per element (``z`` and ``t``; the gradient write is posted,
  nothing waits for it);
- the iteration time T(L) = W + max(0, L - D) for the worst of the loop's global loads, from an in-order issue
  simulation of one warp over ``COPIES`` = 4 back-to-back copies of the loop body (every branch taken, as above):

  * an instruction issues CPI = warps / 4 cycles after the previous one, and not before its source registers are
    ready. The block's warps share the SM's 4 schedulers and run in step (the barriers hold them together), so an
    iteration of n instructions takes at least n x warps / 4 cycles; other resident blocks fill the cycles this
    block waits, and where they contend for issue the issue bound (below) takes over;
  * results are ready ``LATENCY`` cycles after issue (microbenchmarks of Volta to Hopper): 4 for the arithmetic
    pipes, 16 for MUFU and conversions, 24 for shuffles and warp reductions, 30 for shared-memory loads, 20 for
    constant and special-register reads, 400 for an atomic that returns a value (an L2 round trip of a few hundred
    cycles, plus the atomic unit and the same-address serialisation of a block's lanes; waited for only where the
    value is read: ``RED`` and an unread return cost an issue slot), 0 for global loads (their latency
    is the L - D term). A MUFU holds its scheduler's pipe 8 x CPI cycles (16 lanes per SM per clock);
  * a ``BAR`` waits until the warp's shared-memory stores have landed (20 cycles after issue) and releases 24
    cycles later (the warps arrive together: they run the same code);
  * W = the steady-state cycles per iteration (third copy to fourth). D = cycles from a load's issue (second copy)
    to its first consumer: the first instruction that reads its destination registers, across the back edge (a
    prefetch of the next block is first read after it). A ``MOV`` / ``IMAD.MOV`` that copies the loaded value to
    another register is a consumer too: the hardware makes any reader of a pending load's register wait (the
    copies ptxas adds at the loop end to rotate prefetched registers carry a wait on the load's scoreboard in
    their control bits), so a register prefetch hides latency only up to its first copy. For ``LDGSTS``
    (asynchronous copies into shared memory) the ``DEPBAR.LE SB0, n`` that waits for its commit group. No
    consumer within the next two copies: no stall;
- per SM, B x bytes per iteration / T(L) bytes per cycle, at most bandwidth / SMs: the bandwidth fraction
  f = min(1, B x bytes / T(L) / (bandwidth / (SMs x clock))) = min(1, B x bytes x share / (bandwidth x L / SMs)),
  share = L / T(L) the share of an iteration its loads are outstanding (above 1: several iterations in flight);
- memory time = max(all bytes / bandwidth, read bytes / (f x bandwidth)): reads are latency-bound, the gradient
  write only adds bus traffic. A kernel's time = max(memory, issue, MUFU) + the instructions outside the loop,
  as in the ideal bound.

Data-dependent work (AKL's refinement rounds over ``t`` and its rank pass for large tie groups) is measured by
running the forward's kernels through Triton's interpreter on a few sample rows of each teacher profile
(``TEACHERS``: ``peaked`` 3·randn, ``llm`` 2·randn plus 5 tokens at +12, ``flat`` randn at T = 2, ``quarter``
0.25·randn, ``equal`` all zeros), for each teacher dtype, once per run; the profile fixes t / T, the label mode only
the binaries. ``--check`` exits 1 when an estimate at 600 ns misses its target (``TARGETS``, by card, divergence,
teacher, dtypes and CE term, as in issue 18) or the 800 ns estimate exceeds the 600 ns one by more than 15%;
``--json`` prints one object per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

CARDS = {  # bandwidth (bytes/s), SMs, clock (Hz)
    "H100": (3.35e12, 132, 1.98e9),
    "H200": (4.8e12, 132, 1.98e9),
}
ISSUE_PER_CLOCK = 4  # warp-instructions per SM per clock (4 schedulers)
MUFU_PER_CLOCK = 16  # special-function lane operations per SM per clock
# Occupancy limits of sm_90 (CUDA occupancy calculator).
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED = 1024  # bytes reserved per block on sm_90
# DRAM latency under load (ns): the default and the range printed beside it.
LATENCY_NS = 600.0
LATENCIES_NS = (450.0, 600.0, 800.0)
# Cycles until a result can be read, by opcode (the part before the first dot). Published microbenchmarks of
# Volta to Hopper: the FP32/INT pipes ~4 (ALU_LATENCY, every opcode not listed), MUFU and conversions ~14-20,
# shuffles and warp reductions ~20-30, shared-memory loads ~30, constant and special-register reads ~20. An atomic
# that returns a value is an L2 round trip (a few hundred cycles, more from the far L2 partition) plus the
# atomic unit and the same-address serialisation of a block's lanes: 400.
ALU_LATENCY = 4
LATENCY = {
    **dict.fromkeys(("MUFU", "F2I", "I2F", "F2F", "I2I", "FRND"), 16),
    **dict.fromkeys(("SHFL", "REDUX", "VOTE"), 24),
    **dict.fromkeys(("LDS", "LDSM", "ATOMS"), 30),
    **dict.fromkeys(("LDC", "S2R", "S2UR"), 20),
    **dict.fromkeys(("ATOMG", "ATOM"), 400),
    **dict.fromkeys(("LDG", "LDGSTS"), 0),  # global loads: the DRAM latency enters as max(0, L - D)
}
# A scheduler's MUFU pipe does 16 / 4 lanes per clock: a warp's MUFU holds it 8 cycles (x CPI: the block's warps
# on that scheduler take turns).
MUFU_HOLD = 32 * ISSUE_PER_CLOCK // MUFU_PER_CLOCK
STORE_SHARED = 20  # cycles before a shared-memory store is visible to the barrier (a shared-memory write)
BARRIER = 24  # cycles from the last warp's arrival at a barrier to its release (measured ~20-30)
COPIES = 4  # loop bodies simulated back to back
# Issue 18's targets on the occupancy-aware estimate at LATENCY_NS, times the floor: H100, and H200 where it differs.
BASELINES = ("sfkl", "srkl", "jsd", "tvd")
DIVERGENCES = ("fkl", "rkl", "todi", *BASELINES, "akl")
STREAM_TARGETS = {
    "H100": {"fkl": 1.75, "rkl": 1.75, "todi": 2.45, **dict.fromkeys(BASELINES, 2.45)},
    "H200": {"fkl": 1.9, "rkl": 1.9, "todi": 2.6, **dict.fromkeys(BASELINES, 2.6)},
}
AKL_TARGETS = {"peaked": 3.5, "llm": 3.5, "flat": 5.0, "quarter": 6.0, "equal": 6.0}  # H100
AKL_H200 = 1.15  # H200 targets: the H100's x this
LATENCY_SLACK = 1.15  # the estimate at 800 ns is at most this times the one at 600 ns
# (student, teacher) dtypes and label modes (aot.Case) of the variants; AKL also has a bf16 student, fp32 teacher.
DTYPE_PAIRS = (("bf16", "bf16"), ("fp32", "fp32"))
AKL_DTYPE_PAIRS = (*DTYPE_PAIRS, ("bf16", "fp32"))
LABEL_MODES = {"labels": False, "ce_t2": True}  # label mode: has the CE term
# Teacher profiles: description and temperature T; ``teacher_logits`` draws them.
TEACHERS = {
    "peaked": ("3·randn", 1.0),
    "llm": ("2·randn + 12 at 5 random tokens", 1.0),
    "flat": ("randn", 2.0),
    "quarter": ("0.25·randn", 1.0),
    "equal": ("zeros", 1.0),
}
SAMPLE_ROWS = 8  # rows per teacher profile run through the interpreter


def _dtype_name(student: str, teacher: str) -> str:
    return student if student == teacher else f"{student}/{teacher}"


def _targets() -> dict[tuple[str, str, str, str, bool], float]:
    out = {}
    for card, ce in ((c, ce) for c in CARDS for ce in LABEL_MODES.values()):
        for divergence, goal in STREAM_TARGETS[card].items():
            for student, teacher in DTYPE_PAIRS:
                out[card, divergence, "peaked", _dtype_name(student, teacher), ce] = goal
        for profile, goal in AKL_TARGETS.items():
            for student, teacher in AKL_DTYPE_PAIRS:
                out[card, "akl", profile, _dtype_name(student, teacher), ce] = goal * (
                    AKL_H200 if card == "H200" else 1.0
                )
    return out


TARGETS = _targets()  # (card, divergence, teacher profile, dtypes, CE term) -> x floor at LATENCY_NS
SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Tensors each kernel streams once per pass (per element of the row); the resolve kernel reads only its list.
STREAMS = {
    "stats_kernel": ("z", "t"),
    "akl_refine_kernel": ("t",),
    "akl_rank_kernel": ("t",),
    "finish_kernel": ("z", "t"),
    "grad_kernel": ("z", "t", "dz"),
    "akl_resolve_kernel": (),
}
READS = ("z", "t")

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
_REGISTER = re.compile(r"(?<![\w.])(U?R)(\d+)(\.64)?")
_PREDICATE = re.compile(r"!?U?P(?:\d+|T)$")
_DEPBAR = re.compile(r"\bSB0\s*,\s*(0x[0-9a-f]+|\d+)")
# Opcodes (before the first dot) whose register operands are all read: stores, reductions without return,
# control flow and barriers; and those that write only predicates.
NO_REGISTER_DEST = set(
    "ST STG STS STL RED REDG BAR BRA EXIT BSSY BSYNC WARPSYNC DEPBAR LDGDEPBAR LDGSTS MEMBAR FENCE CCTL RET CALL "
    "YIELD ERRBAR ISETP FSETP HSETP2 DSETP PSETP PLOP3 FCHK R2P UISETP UPLOP3".split()
)
MEMORY = set("LDG LDGSTS LDS LDSM LDC LD LDL ST STG STS STL ATOMG ATOMS ATOM RED REDG".split())


def opcode(instruction: str) -> str:
    """The opcode of a SASS instruction, its predicate (``@P0``, ``@!P1``) dropped: ``LDG.E.128``, ``MUFU.EX2``."""
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def parse_sass(text: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` pairs of a kernel's SASS (``cuobjdump -sass``), NOPs dropped."""
    out = []
    for match in _LINE.finditer(text):
        op = match.group(2)
        if opcode(op) != "NOP":
            out.append((int(match.group(1), 16), op))
    return out


def vocabulary_loop(instrs: list[tuple[int, str]]) -> list[str]:
    """The instructions of the innermost loop (a backward branch with no other inside) that loads from global
    memory; the largest such loop if there are several; empty when the kernel has none."""
    loops = []
    for addr, op in instrs:
        found = _BRANCH.search(op)
        if found and found.group(1) and int(found.group(1), 16) <= addr:
            loops.append((int(found.group(1), 16), addr))
    inner = [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    bodies = [[op for addr, op in instrs if a <= addr <= b] for a, b in inner]
    bodies = [body for body in bodies if any(opcode(op).startswith("LDG") for op in body)]
    return max(bodies, key=len, default=[])


@dataclass(frozen=True)
class Op:
    """One SASS instruction: opcode, the registers it writes and reads (``R12``, ``UR4``), and whether a predicate
    guards it (a guarded write may leave the old value)."""

    name: str
    dest: frozenset[str]
    src: frozenset[str]
    guarded: bool
    text: str

    @property
    def unit(self) -> str:
        return self.name.split(".")[0]


def _width(name: str) -> int:
    """Registers of the value a memory or wide instruction moves: 4 for ``.128`` (and ``LDSM ... .4``), 2 for
    ``.64``, ``IMAD.WIDE`` and ``CS2R``, else 1."""
    parts = name.split(".")
    if parts[0] == "LDSM":
        return int(parts[-1]) if parts[-1].isdigit() else 1
    if "128" in parts:
        return 4
    if "64" in parts or "WIDE" in parts or (parts[0] == "CS2R" and "32" not in parts):
        return 2
    return 1


def _lane_bytes(name: str) -> int:
    """Bytes one lane of a load moves: 1 or 2 for ``.U8``/``.S8``/``.U16``/``.S16``, else 4 per register."""
    parts = name.split(".")
    return 1 if {"U8", "S8"} & set(parts) else 2 if {"U16", "S16"} & set(parts) else 4 * _width(name)


def decode(instruction: str) -> Op:
    """Registers written and read by one instruction. The destination is the first operand after any leading
    predicate operands (``SHFL.BFLY PT, R11, ...``, ``LOP3.LUT P1, R15, ...``), except for the opcodes of
    ``NO_REGISTER_DEST``; a ``.64`` operand names a register pair, and so does the last source of ``IMAD.WIDE``;
    the data operand of a memory instruction and the destination of a wide one span ``_width`` registers."""
    guarded = instruction.startswith("@")
    words = instruction.split(None, 2 if guarded else 1)
    name = words[int(guarded)]
    rest = words[int(guarded) + 1] if len(words) > int(guarded) + 1 else ""
    operands = [o.strip() for o in rest.split(",")] if rest else []
    unit = name.split(".")[0]
    width = _width(name)
    target = None
    if unit not in NO_REGISTER_DEST:
        target = next((i for i, o in enumerate(operands) if not _PREDICATE.match(o)), None)
    found = [(i, m, "[" in o[: m.start()]) for i, o in enumerate(operands) for m in _REGISTER.finditer(o)]
    dest: set[str] = set()
    src: set[str] = set()
    for n, (i, match, inside) in enumerate(found):
        if match.group(3) or ("WIDE" in name.split(".") and n == len(found) - 1 and i != target):
            count = 2
        elif i == target or (unit in MEMORY and not inside):
            count = width
        else:
            count = 1
        kind, number = match.group(1), int(match.group(2))
        (dest if i == target else src).update(f"{kind}{number + k}" for k in range(count))
    return Op(name, frozenset(dest), frozenset(src), guarded, instruction)


def _issue_times(body: list[Op], cpi: float) -> list[float]:
    """Issue cycle of each instruction of ``COPIES`` back-to-back copies of the loop body, for one warp issuing
    in order every ``cpi`` cycles at best, each instruction waiting for its sources (``LATENCY``), a MUFU for its
    pipe, a barrier for the warp's shared stores."""
    ready: dict[str, float] = {}
    last = -cpi
    mufu_free = shared_done = 0.0
    times = []
    for op in body * COPIES:
        start = max([last + cpi, *(ready.get(r, 0.0) for r in op.src)])
        if op.unit == "MUFU":
            start = max(start, mufu_free)
            mufu_free = start + MUFU_HOLD * cpi
        if op.unit == "BAR":
            start = max(start, shared_done)
        times.append(start)
        last = start + (BARRIER if op.unit == "BAR" else 0)
        for r in op.dest:
            ready[r] = start + LATENCY.get(op.unit, ALU_LATENCY)
        if op.unit in ("STS", "ATOMS"):
            shared_done = max(shared_done, start + STORE_SHARED)
    return times


def _first_consumer(stream: list[Op], index: int) -> int | None:
    """Position in ``stream`` of the first instruction that needs the global load at ``index``: for ``LDG``, the
    first that reads its destination registers (a ``MOV`` copy too: it waits for the value), for ``LDGSTS`` the
    first ``DEPBAR.LE SB0, n`` that leaves fewer than its commit group's successors pending; None if none does."""
    load = stream[index]
    if load.unit == "LDGSTS":
        group = commits = sum(op.unit == "LDGDEPBAR" for op in stream[:index])  # its group: the next commit
        for j in range(index, len(stream)):
            waits = _DEPBAR.search(stream[j].text) if stream[j].unit == "DEPBAR" else None
            if waits and group <= commits - 1 - int(waits.group(1), 0):
                return j
            commits += stream[j].unit == "LDGDEPBAR"
        return None
    live = set(load.dest)
    for j in range(index + 1, len(stream)):
        op = stream[j]
        if live & op.src:
            return j
        if not op.guarded:
            live -= op.dest
        if not live:
            return None
    return None


@dataclass
class LoopTiming:
    """The loop's work W (cycles per iteration without DRAM stalls) and, per global load, D: cycles from its issue
    to its first consumer (None: never waited for within the simulated copies)."""

    work: float
    loads: list[tuple[str, float | None]]

    def iteration(self, latency_cycles: float) -> float:
        """T(L) = W + max(0, L - D) for the worst load."""
        stalls = [latency_cycles - d for _, d in self.loads if d is not None]
        return self.work + max([0.0, *stalls])


def loop_timing(loop: list[str], warps: int) -> LoopTiming:
    """W and the loads' D of a vocabulary loop run by blocks of ``warps`` warps (CPI = warps / 4)."""
    body = [decode(op) for op in loop]
    if not body:
        return LoopTiming(0.0, [])
    times = _issue_times(body, max(1.0, warps / ISSUE_PER_CLOCK))
    stream = body * COPIES
    n = len(body)
    loads = []
    for i in range(n, 2 * n):  # the loads of the second copy
        if stream[i].unit in ("LDG", "LDGSTS"):
            j = _first_consumer(stream, i)
            loads.append((stream[i].name, None if j is None else times[j] - times[i]))
    return LoopTiming(work=(times[3 * n] - times[2 * n]), loads=loads)


def resident_blocks(registers: int, warps: int, shared: int) -> int:
    """Blocks per SM that registers (per warp, in units of ``REGISTER_UNIT``), warps, shared memory (plus the
    per-block reserve) and the block limit allow."""
    per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_UNIT) * REGISTER_UNIT
    return min(
        REGISTERS_PER_SM // (per_warp * warps),
        WARPS_PER_SM // warps,
        SHARED_PER_SM // (shared + SHARED_RESERVED),
        BLOCKS_PER_SM,
    )


@dataclass
class KernelCost:
    """Static counts of one launched kernel; the occupancy fields default to none (only the ideal bound)."""

    name: str
    warps: int
    block: int  # elements per loop iteration (E)
    loop_instr: int
    loop_mufu: int
    other_instr: int
    bytes_per_elem: float
    registers: int
    local_bytes: int
    read_bytes_per_elem: float = 0.0
    shared: int = 0
    blocks: int = 0  # resident per SM
    work: float = 0.0  # W, cycles per iteration
    loads: list = field(default_factory=list)  # (opcode, D cycles or None)

    @property
    def instr_per_elem(self) -> float:
        return self.loop_instr * self.warps / self.block if self.block else 0.0

    @property
    def mufu_per_elem(self) -> float:
        return self.loop_mufu * self.warps * 32 / self.block if self.block else 0.0

    @property
    def bytes_per_iteration(self) -> float:
        return self.block * self.read_bytes_per_elem

    def bandwidth_fraction(self, card: str, latency_ns: float, programs: float | None = None) -> float:
        """f = min(1, B x bytes per iteration / T(L) / (bandwidth / (SMs x clock))), B at most the ``programs``
        per SM; 1 without loads."""
        bandwidth, sms, clock = CARDS[card]
        if not self.bytes_per_iteration:
            return 1.0
        blocks = self.blocks if programs is None else min(self.blocks, max(1, math.ceil(programs / sms)))
        per_cycle = (
            blocks * self.bytes_per_iteration / LoopTiming(self.work, self.loads).iteration(latency_ns * 1e-9 * clock)
        )
        return min(1.0, per_cycle / (bandwidth / (sms * clock)))

    def share_outstanding(self, card: str, latency_ns: float) -> float:
        """L / T(L): the share of an iteration its loads are in flight."""
        latency = latency_ns * 1e-9 * CARDS[card][2]
        return latency / LoopTiming(self.work, self.loads).iteration(latency) if self.block else 0.0

    def seconds(
        self, card: str, rows: float, vocab: int, programs: float | None = None, latency_ns: float | None = None
    ) -> tuple[float, str]:
        """Time of ``rows`` row-passes (``programs`` programs, default one per row) and its bound (memory, issue
        or mufu): the ideal bound, or with ``latency_ns`` the occupancy-aware estimate."""
        bandwidth, sms, clock = CARDS[card]
        elems = rows * vocab
        memory = elems * self.bytes_per_elem / bandwidth
        if latency_ns is not None:
            memory = max(
                memory,
                elems * self.read_bytes_per_elem / (bandwidth * self.bandwidth_fraction(card, latency_ns, programs)),
            )
        times = {
            "memory": memory,
            "issue": (
                elems * self.instr_per_elem + (rows if programs is None else programs) * self.other_instr * self.warps
            )
            / (sms * ISSUE_PER_CLOCK * clock),
            "mufu": elems * self.mufu_per_elem / (sms * MUFU_PER_CLOCK * clock),
        }
        bound = max(times, key=times.get)
        return times[bound], bound


def pass_bytes(divergence: str, vocab: int, student: str, teacher: str) -> dict[str, int]:
    """Bytes one row streams through the launched kernels, ``forward`` and ``backward`` (the gradient pass) and
    their ``total``, counting the data-dependent AKL passes (refinement, rank) as not taken."""
    from kdkernels.kernels import aot

    size = {"z": SIZES[student], "t": SIZES[teacher], "dz": SIZES[student]}
    out = {"forward": 0, "backward": 0}
    for record in aot.launched(aot.Case(divergence, student, teacher, "labels", vocab, rows=1)):
        name = aot.kernel_name(record)
        if name not in ("akl_refine_kernel", "akl_rank_kernel"):
            out["backward" if name == "grad_kernel" else "forward"] += vocab * sum(size[s] for s in STREAMS[name])
    return dict(out, total=out["forward"] + out["backward"])


_COSTS: dict[str, KernelCost] = {}


def kernel_cost(record, student: str, teacher: str) -> KernelCost:
    """Compile one recorded launch for sm_90a and count its SASS (once per binary)."""
    from kdkernels.kernels import aot

    key = aot.binary_key(record, 90)
    if key not in _COSTS:
        compiled = aot.compile_launch(record, 90)
        cubin = compiled.asm["cubin"]
        instrs = parse_sass(aot.sass(cubin))
        loop = vocabulary_loop(instrs)
        name = aot.kernel_name(record)
        size = {"z": SIZES[student], "t": SIZES[teacher], "dz": SIZES[student]}
        reads = sum(size[s] for s in STREAMS[name] if s in READS)
        warps = record.meta["num_warps"]
        block = record.meta.get("BLOCK_V", 0) if loop else 0
        loads = [opcode(op) for op in loop if opcode(op).split(".")[0] in ("LDG", "LDGSTS")]
        loaded = sum(_lane_bytes(name) * 32 * warps for name in loads)
        if block and reads:
            block *= max(1, round(loaded / (block * reads)))
        timing = loop_timing(loop, warps)
        res = aot.resources(cubin)
        shared = res["shared"] + compiled.metadata.shared  # static + dynamic (Triton's buffers)
        _COSTS[key] = KernelCost(
            name=name,
            warps=warps,
            block=block,
            loop_instr=len(loop),
            loop_mufu=sum(opcode(op).startswith("MUFU") for op in loop),
            other_instr=len(instrs) - len(loop),
            bytes_per_elem=sum(size[s] for s in STREAMS[name]),
            registers=res["reg"],
            local_bytes=res["local"] + res["stack"],
            read_bytes_per_elem=reads,
            shared=shared,
            blocks=resident_blocks(res["reg"], warps, shared),
            work=timing.work,
            loads=timing.loads,
        )
    return _COSTS[key]


def teacher_logits(profile: str, rows: int, vocab: int, generator):
    """Float32 teacher logits of a ``TEACHERS`` profile (before the temperature)."""
    import torch

    if profile == "equal":
        return torch.zeros(rows, vocab)
    scale = {"peaked": 3.0, "llm": 2.0, "flat": 1.0, "quarter": 0.25}[profile]
    t = scale * torch.randn(rows, vocab, generator=generator)
    if profile == "llm":
        t[torch.arange(rows)[:, None], torch.randint(vocab, (rows, 5), generator=generator)] += 12.0
    return t


def start_sampling(pairs: list[tuple[str, str]], vocab: int) -> subprocess.Popen:
    """Start measuring AKL's data-dependent passes for ``(teacher profile, teacher dtype)`` pairs: the kernels run
    by Triton's interpreter in a subprocess (the interpreter must be set before triton is imported), in parallel
    with the compilation; :func:`sampled_passes` collects them."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import json; from bench.roofline import _passes; print(json.dumps(_passes({pairs!r}, {vocab})))"
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def sampled_passes(proc: subprocess.Popen) -> dict[tuple[str, str], dict[str, float]]:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"sampling AKL's passes failed:\n{err}")
    return {tuple(k.split("/")): v for k, v in json.loads(out.splitlines()[-1]).items()}


def _passes(pairs: list[tuple[str, str]], vocab: int) -> dict[str, dict[str, float]]:
    import torch

    from kdkernels.kernels import launch
    from kdkernels.torch_ops.options import KDOptions

    launch.INTERPRETER_CAPACITY = launch.CAPACITY  # sample the GPU configuration
    out = {}
    for profile, dtype in pairs:
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(SAMPLE_ROWS, vocab, generator=gen).to(torch.bfloat16)
        t = teacher_logits(profile, SAMPLE_ROWS, vocab, gen).to(
            {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        )
        with launch.recording() as records:
            launch.kd_forward(z, t, None, KDOptions("akl", temperature=TEACHERS[profile][1]))
        out[f"{profile}/{dtype}"] = akl_passes(records)
    return out


def akl_passes(records) -> dict[str, float]:
    """Mean row passes of AKL's data-dependent kernels, from the recorded forward launches: runs them in order up
    to the last data-dependent one, then reads what the kernels report in AKL's scratch (the ``(N, AKL_COLS)``
    argument): the refinement rounds a row needed, and whether a row's bracket outgrew the list (rank pass)."""
    from kdkernels.kernels import common, launch

    reports = {  # kernel: its passes per row, from the scratch
        "akl_refine_kernel": lambda akl: akl[:, common.AKL_ROUNDS.value],
        "akl_rank_kernel": lambda akl: (akl[:, common.AKL_COUNT.value] > launch.CAPACITY).double(),
    }
    dependent = [i for i, r in enumerate(records) if r.kernel.fn.__name__ in reports]
    if not dependent:
        return {}
    for r in records[: dependent[-1] + 1]:
        r.kernel[r.grid](*r.args, **r.meta)
    first = records[dependent[0]]
    akl = first.args[first.kernel.arg_names.index("akl_ptr")]
    return {name: read(akl).mean().item() for name, read in reports.items()}


def _variants() -> list[tuple[str, str, str, str]]:
    """(divergence, student, teacher dtype, label mode) of every variant judged."""
    return [
        (d, s, t, labels)
        for d in DIVERGENCES
        for s, t in (AKL_DTYPE_PAIRS if d == "akl" else DTYPE_PAIRS)
        for labels in LABEL_MODES
    ]


def variant_costs(
    divergence: str, student: str, teacher_dtype: str, labels: str, rows: int, vocab: int
) -> list[tuple[KernelCost, int]]:
    """The launched kernels of one variant, each with its programs (grid size)."""
    from kdkernels.kernels import aot

    case = aot.Case(divergence, student, teacher_dtype, labels, vocab, rows)
    return [(kernel_cost(r, student, teacher_dtype), math.prod(r.grid)) for r in aot.launched(case)]


def variant_rows(
    variant: tuple[str, str, str, str],
    costs: list[tuple[KernelCost, int]],
    rows: int,
    vocab: int,
    sampled: dict[tuple[str, str], dict[str, float]],
) -> list[dict]:
    """One result per teacher profile (AKL) or one (the others): per-kernel figures and, per card, the ideal bound
    and the estimates at ``LATENCIES_NS`` (ms and x floor)."""
    divergence, student, teacher_dtype, labels = variant
    floor_bytes = rows * vocab * (2 * SIZES[student] + SIZES[teacher_dtype])
    results = []
    for profile in TEACHERS if divergence == "akl" else ("peaked",):
        passes = sampled[profile, teacher_dtype] if divergence == "akl" else {}
        out = dict(
            divergence=divergence,
            student=student,
            teacher_dtype=teacher_dtype,
            dtype=_dtype_name(student, teacher_dtype),
            labels=labels,
            ce=LABEL_MODES[labels],
            teacher=profile,
            rows=rows,
            vocab=vocab,
            sampled=passes,
            kernels=[],
        )
        for cost, programs in costs:
            k = dict(
                cost.__dict__,
                passes=passes.get(cost.name, 1.0),
                instr_per_elem=cost.instr_per_elem,
                mufu_per_elem=cost.mufu_per_elem,
                bytes_per_iteration=cost.bytes_per_iteration,
                cards={},
            )
            for card in CARDS:
                k["cards"][card] = dict(
                    bound=cost.seconds(card, rows, vocab, programs)[1],
                    bound_at_latency=cost.seconds(card, rows, vocab, programs, LATENCY_NS)[1],
                    share=cost.share_outstanding(card, LATENCY_NS),
                    fraction={f"{ns:g}": cost.bandwidth_fraction(card, ns, programs) for ns in LATENCIES_NS},
                )
            out["kernels"].append(k)
        for card in CARDS:
            floor = floor_bytes / CARDS[card][0]
            times = {}
            for label, latency in (("ideal", None), *((f"{ns:g}", ns) for ns in LATENCIES_NS)):
                times[label] = sum(
                    cost.seconds(
                        card, rows * passes.get(cost.name, 1.0), vocab, programs * passes.get(cost.name, 1.0), latency
                    )[0]
                    for cost, programs in costs
                )
            out[card] = dict(
                floor_ms=1e3 * floor,
                ms={k: 1e3 * v for k, v in times.items()},
                x_floor={k: v / floor for k, v in times.items()},
                target=TARGETS.get((card, divergence, profile, out["dtype"], out["ce"])),
            )
        results.append(out)
    return results


def all_rows(rows: int, vocab: int) -> list[dict]:
    """Every variant of ``_variants``; AKL for every teacher profile. The kernels compile while a subprocess
    samples AKL's passes."""
    variants = _variants()
    sampling = start_sampling(sorted({(p, v[2]) for v in variants if v[0] == "akl" for p in TEACHERS}), vocab)
    try:
        costs = [variant_costs(*v, rows, vocab) for v in variants]
    except BaseException:
        sampling.kill()
        raise
    sampled = sampled_passes(sampling)
    return [r for v, c in zip(variants, costs) for r in variant_rows(v, c, rows, vocab, sampled)]


def misses(result: dict) -> list[str]:
    """What a result misses: its target at ``LATENCY_NS`` on a card, or the 800 ns estimate more than
    ``LATENCY_SLACK`` times the 600 ns one."""
    out = []
    for card in CARDS:
        x = result[card]["x_floor"]
        goal = result[card]["target"]
        if goal is not None and x[f"{LATENCY_NS:g}"] > goal:
            out.append(f"{card} {x[f'{LATENCY_NS:g}']:.2f}>{goal:.4g}")
        if x["800"] > LATENCY_SLACK * x["600"]:
            out.append(f"{card} 800/600 ns {x['800'] / x['600']:.2f}")
    return out


def _name(r: dict, teacher: bool = True) -> str:
    """``akl flat bf16/fp32 +ce``: divergence, teacher profile (AKL's only), dtypes, CE term."""
    profile = f"{r['teacher'] if r['divergence'] == 'akl' else '':<7} " if teacher else ""
    return f"{r['divergence']:<4} {profile}{r['dtype']:<9} {'+ce' if r['ce'] else '':<3}"


def _say(text: str) -> None:
    """Print a paragraph wrapped at 120 columns (a leading newline kept)."""
    print(("\n" if text.startswith("\n") else "") + textwrap.fill(text.strip(), 120))


def print_report(results: list[dict]) -> None:
    first = results[0]
    _say(
        f"Static cost model, forward + backward, N={first['rows']} V={first['vocab']}; sm_90a SASS of the launched "
        f"kernels; H100 {CARDS['H100'][0] / 1e12:.2f} TB/s, H200 {CARDS['H200'][0] / 1e12:.2f} TB/s, "
        f"{CARDS['H100'][1]} SMs at {CARDS['H100'][2] / 1e9:.2f} GHz; DRAM latency {LATENCY_NS:g} ns "
        f"(also {', '.join(f'{ns:g}' for ns in LATENCIES_NS if ns != LATENCY_NS)}). AKL teachers: "
        + ", ".join(f"{name} = {what} at T = {t:g}" for name, (what, t) in TEACHERS.items())
    )
    _say(
        "\nPer kernel (each binary once; +ce: the CE term's binary where it differs): E = elements per loop "
        "iteration, instr / mufu = warp-instructions / MUFU lane ops per element, B/el = bytes per element, "
        "B = resident blocks per SM, KB/it = bytes one iteration loads, W = cycles per iteration without DRAM "
        "stalls, D = cycles from the worst load to its consumer (- : never waited for), share = loads outstanding "
        "/ iteration (600 ns, H100), f = bandwidth fraction at 450/600/800 ns, bound = ideal / estimate (H100)"
    )
    head = (
        f"{'variant':<18} {'kernel':<18} {'regs':>4} {'spill':>5} {'E':>5} {'instr':>5} {'mufu':>5} {'B/el':>4} "
        f"{'B':>2} {'KB/it':>5} {'W':>5} {'D':>5} {'share':>5} {'f H100':>14} {'f H200':>14} {'bound':>13}"
    )
    print(head)
    print("-" * len(head))
    seen = set()
    for r in results:
        for k in r["kernels"]:
            key = (k["name"], k["registers"], k["block"], k["loop_instr"], k["work"], r["dtype"], r["divergence"])
            if key in seen:
                continue
            seen.add(key)
            d = min((x for _, x in k["loads"] if x is not None), default=None)
            cards = k["cards"]
            fractions = {c: "/".join(f"{v:.2f}" for v in cards[c]["fraction"].values()) for c in CARDS}
            print(
                f"{_name(r, teacher=False)} {k['name']:<18} {k['registers']:>4} {k['local_bytes']:>5} {k['block']:>5} "
                f"{k['instr_per_elem']:>5.2f} {k['mufu_per_elem']:>5.2f} {k['bytes_per_elem']:>4g} "
                f"{k['blocks']:>2} {k['bytes_per_iteration'] / 1024:>5.1f} {k['work']:>5.0f} "
                f"{'-' if d is None else f'{d:.0f}':>5} {cards['H100']['share']:>5.2f} {fractions['H100']:>14} "
                f"{fractions['H200']:>14} {cards['H100']['bound'] + '/' + cards['H100']['bound_at_latency']:>13}"
            )
    _say(
        "\nPer variant, x the floor (one read of z and t, one gradient write): ideal bound (full bandwidth), the "
        "occupancy-aware estimate at 600 ns and at 450 / 800 ns; target on the 600 ns estimate; passes = AKL's "
        "sampled refinement rounds + rank passes per row; +ce = labels and the CE term at T = 2 (else labels only); "
        "ok: what misses (800/600 ns: the 800 ns estimate over the 600 ns one, at most 1.15)"
    )
    head = (
        f"{'variant':<26} {'passes':>6} | {'H100 ideal':>10} {'600':>5} {'450':>5} {'800':>5} {'target':>6} | "
        f"{'H200 ideal':>10} {'600':>5} {'450':>5} {'800':>5} {'target':>6} | ok"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        passes = sum(r["sampled"].values()) if r["sampled"] else None
        cells = []
        for card in CARDS:
            x, goal = r[card]["x_floor"], r[card]["target"]
            cells.append(
                f"{x['ideal']:>10.2f} {x['600']:>5.2f} {x['450']:>5.2f} {x['800']:>5.2f} "
                f"{'' if goal is None else f'{goal:.4g}':>6}"
            )
        missed = misses(r)
        print(
            f"{_name(r)} {'' if passes is None else f'{passes:.2f}':>6} | {' | '.join(cells)} | "
            f"{'NO ' + ', '.join(missed) if missed else 'yes'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192, help="N, rows (default 8192)")
    parser.add_argument("--vocab", type=int, default=128256, help="V, vocabulary (default 128256)")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant and teacher profile")
    parser.add_argument("--check", action="store_true", help="exit 1 when an estimate misses its target")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = all_rows(args.rows, args.vocab)
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print_report(results)
    return 1 if args.check and any(misses(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
