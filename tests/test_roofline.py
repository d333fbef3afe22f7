"""The static cost model (``python -m bench.roofline``): its SASS walk, occupancy, and the speed targets.

The model compiles the launched kernels for sm_90a and analyses their vocabulary loops (no GPU). The targets of
issue 18 are judged on the occupancy-aware estimate at 600 ns DRAM latency, on the H100 and the H200, for every
variant (bf16 and fp32, with and without the CE term; AKL for five teacher profiles and also a bf16 student with a
float32 teacher): fkl/rkl 1.75x the floor (H100) and 1.9x (H200); todi, sfkl, srkl, jsd, tvd 2.45x / 2.6x; akl
3.5x (peaked, llm), 5x (flat), 6x (quarter, equal) on the H100, 15% more on the H200; and the 800 ns estimate at
most 15% above the 600 ns one; and no kernel may spill. The model runs once, in a subprocess without
``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

import json
import os
import subprocess
import sys

import pytest

from bench.roofline import (
    BARRIER,
    BASELINES,
    LATENCY,
    LATENCY_SLACK,
    TARGETS,
    decode,
    loop_timing,
    parse_sass,
    resident_blocks,
    vocabulary_loop,
)

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/                   FADD R3, R2, R2 ;
        /*0030*/                   MUFU.EX2 R4, R3 ;
        /*0040*/                   NOP ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   FADD R5, R4, R4 ;
        /*0070*/                   BRA 0x60 ;
        /*0080*/                   EXIT ;
"""

# A loop run by 4 warps (one per scheduler: an instruction per cycle at best): a load consumed at once; a block
# reduction through shared memory and a barrier; a prefetch of the next block into R20..R23, issued after this
# iteration's last reader of R20 (the next iteration reads it); an atomic whose return is read; a RED (no return).
PIPELINED = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R8, desc[UR4][R4.64] ;
        /*0020*/                   FADD R9, R8, R10 ;
        /*0030*/                   STS [R6], R9 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   LDS R11, [R7] ;
        /*0060*/                   FADD R12, R11, R20 ;
        /*0070*/                   LDG.E.128 R20, desc[UR4][R2.64] ;
        /*0080*/                   ATOMG.E.ADD.STRONG.GPU PT, R13, desc[UR4][R14.64], R12 ;
        /*0090*/                   IMAD.SHL.U32 R15, R13, 0x4, RZ ;
        /*00a0*/                   RED.E.ADD.STRONG.GPU desc[UR4][R16.64], R12 ;
        /*00b0*/               @P0 BRA 0x10 ;
        /*00c0*/                   EXIT ;
"""


def test_loop_is_the_innermost_backward_branch_that_loads():
    instrs = parse_sass(SASS)
    assert len(instrs) == 8  # the NOP is dropped
    loop = vocabulary_loop(instrs)
    assert [op.split()[0] for op in loop] == ["LDG.E", "FADD", "MUFU.EX2", "@P0"]  # the 0x60 loop loads nothing


def test_operands():
    load = decode("@!P2 LDG.E.128 R28, desc[UR12][R10.64]")
    assert load.guarded and load.dest == {"R28", "R29", "R30", "R31"} and load.src == {"UR12", "R10", "R11"}
    assert decode("SHFL.BFLY PT, R11, R10, 0x10, 0x1f").dest == {"R11"}
    assert decode("LOP3.LUT P1, R15, R15, 0x7, RZ, 0xc0, !PT").dest == {"R15"}
    assert decode("ISETP.GE.AND P2, PT, R9.reuse, R34, PT").dest == set()
    assert decode("STG.E.128 desc[UR4][R8.64], R4").src == {"UR4", "R8", "R9", "R4", "R5", "R6", "R7"}
    assert decode("ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R8, desc[UR24][R2.64+0x24], R5").dest == {"R8"}


def test_walk_finds_prefetch_stall_barrier_and_returned_atomic():
    loop = vocabulary_loop(parse_sass(PIPELINED))
    timing = loop_timing(loop, warps=4)
    # Steady state, from the first LDG at cycle 0: its FADD at 1 (D = 1), STS at 5, the barrier waits for the store
    # to land (25) and releases BARRIER cycles later, LDS at 50, FADD at 80, the prefetch at 81, ATOMG at 84 (after
    # R12), its reader at 84 + 400, RED, BRA: the next iteration at 487.
    assert LATENCY["ATOMG"] == 400 and BARRIER == 24
    work = 487
    assert timing.work == work
    # the prefetch (at 81) is first read by the next iteration's FADD (at 487 + 80)
    assert timing.loads == [("LDG.E", 1), ("LDG.E.128", work - 1)]
    assert timing.iteration(1188) == work + 1188 - 1  # the consumed-at-once load stalls the iteration
    # without the consumed-at-once load only the prefetch can stall: latencies up to its D hide behind the work
    prefetch = loop_timing([op for op in loop if not op.startswith("LDG.E R8")], warps=4)
    ((_, d),) = prefetch.loads
    assert d == prefetch.work - 1 and prefetch.iteration(d) == prefetch.work
    assert prefetch.iteration(d + 100) == prefetch.work + 100
    # a MOV that copies the prefetched registers at the loop end waits for them: it is the consumer
    copied = loop_timing([*loop[:-1], "MOV R24, R20", loop[-1]], warps=4)
    assert copied.loads[1] == ("LDG.E.128", work - 1 - 81)
    # the atomic's return unread (no IMAD.SHL): its latency leaves the path, and a RED never was on it
    no_reader = loop_timing([op for op in loop if not op.startswith("IMAD.SHL")], warps=4)
    assert no_reader.work == work - 400
    # the prefetched value never read: no stall from it (the next LDG rewrites its registers)
    unread = loop_timing([op.replace("R11, R20", "R11, R10") for op in loop], warps=4)
    assert unread.loads[1] == ("LDG.E.128", None)
    # 8 warps share the schedulers two by two: more issue cycles
    assert loop_timing(loop, warps=8).work > work


def test_asynchronous_copies_wait_at_their_commit_group():
    loop = [
        "DEPBAR.LE SB0, 0x1",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "LDS.128 R4, [R3]",
        "FADD R8, R4, R5",
        "LDGSTS.E.BYPASS.128 [R15+0x1000], desc[UR12][R2.64], P2",
        "LDGDEPBAR",
        "@!P0 BRA 0x4d0",
    ]
    timing = loop_timing(loop, warps=4)
    # the copy of iteration k is waited for by the DEPBAR of iteration k + 2 (one more group may stay pending)
    ((name, d),) = timing.loads
    assert name.startswith("LDGSTS") and timing.work < d < 2 * timing.work


def test_resident_blocks():
    assert resident_blocks(93, 8, 1024) == 2  # 96 x 32 x 8 registers per block
    assert resident_blocks(128, 8, 1024) == 2
    assert resident_blocks(64, 8, 1024) == 4
    assert resident_blocks(217, 8, 1024) == 1
    assert resident_blocks(32, 8, 0) == 8  # 64 warps
    assert resident_blocks(16, 32, 0) == 2
    assert resident_blocks(32, 4, 100_000) == 2  # shared memory: 228 KB / (100000 + 1 KB reserved)
    assert resident_blocks(16, 1, 0) == 32


@pytest.mark.full
def test_every_variant_meets_its_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.roofline", "--json", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.stdout, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    got = {}
    for r in rows:
        for card in ("H100", "H200"):
            got[card, r["divergence"], r["teacher"], r["dtype"], r["ce"]] = r[card]["x_floor"]
    assert set(TARGETS) <= set(got)
    spills = {
        (r["divergence"], r["dtype"], r["ce"], k["name"]): k["local_bytes"]
        for r in rows
        for k in r["kernels"]
        if k["local_bytes"]
    }
    # the baselines: three passes (SPEC §6), each bound by memory in the ideal model
    baselines = [r for r in rows if r["divergence"] in BASELINES]
    assert {r["divergence"] for r in baselines} == set(BASELINES)
    passes = {
        (r["divergence"], r["dtype"], r["ce"]): [(k["name"], k["cards"]["H100"]["bound"]) for k in r["kernels"]]
        for r in baselines
        if [k["name"] for k in r["kernels"]] != ["stats_kernel", "finish_kernel", "grad_kernel"]
        or any(k["cards"]["H100"]["bound"] != "memory" for k in r["kernels"])
    }
    missed = {
        key: (round(got[key]["600"], 2), round(goal, 3)) for key, goal in TARGETS.items() if got[key]["600"] > goal
    }
    slow = {key: round(x["800"] / x["600"], 3) for key, x in got.items() if x["800"] > LATENCY_SLACK * x["600"]}
    assert not (spills or passes or missed or slow), (
        f"spills (local bytes): {spills}; baselines not three memory-bound passes: {passes}; "
        f"misses (estimate at 600 ns, target): {missed}; 800 ns / 600 ns above {LATENCY_SLACK}: {slow}"
    )
    assert out.returncode == 0
