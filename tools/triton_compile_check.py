#!/usr/bin/env python
"""Compile the loss's Triton kernels for a CUDA target without a GPU, and report their resources.

Triton's NVIDIA backend (LLVM, ptxas) ships in the triton wheel, so every kernel variant the loss
launches can be compiled to a cubin on any machine: this catches compile errors before a GPU run
and shows registers, spilled bytes and shared memory per variant (from cuobjdump).

    python tools/triton_compile_check.py                 # sm_90 (H100/H200), the Qwen3 shapes
    python tools/triton_compile_check.py --arch 100 --quick
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels for the GPU")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_ext.loss import _triton_kernels as tk  # noqa: E402


def _signature(fn, dtypes: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else dtypes[name]
    return sig


def _variants(quick: bool):
    """(label, kernel, arg dtypes, constexprs, num_warps) of the launches the loss makes."""
    group = tk.GROUP
    stats_types = {
        "z_ptr": "*bf16", "out_ptr": "*fp32", "target_ptr": "*i64", "valid_ptr": "*i1",
        "block_ptr": "*fp32", "idx_ptr": "*i64", "ties_ptr": "*i1", "scratch_ptr": "*i32",
        "n_rows": "i32", "vp": "i32", "vocab_start": "i32", "kk": "i32", "vp_float": "fp32",
    }  # fmt: skip
    shapes = [("tp1", 151_936), ("tp2", 75_968), ("tp8", 18_992)]
    if quick:
        shapes = shapes[1:2]
    for label, vp in shapes:
        block, single = tk._row_tile(vp, _Cuda(), None, group)
        ng_pad = tk._next_pow2(triton.cdiv(vp, group))
        for dtype in ("bf16", "fp32"):
            for preset, find, mark, save, kk in (
                ("ce", False, False, False, 1),
                ("ce+stats", True, False, False, 100),
                ("tail", True, True, True, 100),
            ):
                if quick and (dtype == "fp32" or preset == "ce+stats"):
                    continue
                types = dict(stats_types, z_ptr=f"*{dtype}")
                const = dict(
                    FIND_TOPK=find, MARK=mark, SAVE_IDX=save, BLOCK=block, GROUP=group,
                    NG_PAD=ng_pad if find else 1, SEL=tk._next_pow2(2 * kk) if find else 0,
                    SINGLE=single,
                )  # fmt: skip
                yield (
                    f"stats {label} {dtype} {preset}",
                    tk._statistics_kernel, types, const, tk.CUDA_NUM_WARPS,
                )  # fmt: skip
        for dtype in ("bf16", "fp32"):
            for fix in (False, True):
                if quick and dtype == "fp32":
                    continue
                types = {
                    "buf_ptr": "*fp32", "grad_ptr": f"*{dtype}", "grad_loss_ptr": "*fp32",
                    "valid_ptr": "*i1", "target_ptr": "*i64", "block_ptr": "*fp32",
                    "shift_ptr": "*fp32", "tau_ptr": "*fp32", "logprob_ptr": "*fp32",
                    "w_pos_ptr": "*fp32", "weight_sum_ptr": "*fp32", "marked_ptr": "*i1",
                    "idx_ptr": "*i64", "n_rows": "i32", "vp": "i32", "vocab_start": "i32",
                    "kk": "i32", "lambda_head": "fp32", "lambda_tail": "fp32",
                }  # fmt: skip
                const = dict(
                    HAS_MARKS=fix, FIX_TOP=fix, OUT_BF16=dtype == "bf16",
                    BLOCK=min(block, tk.CUDA_CHUNK), GROUP=group, KK_BLOCK=128,
                )  # fmt: skip
                label_g = f"grad {label} {dtype} fix_top={fix}"
                yield label_g, tk._gradient_kernel, types, const, tk.CUDA_NUM_WARPS
    merge_types = {
        "g_ptr": "*fp32", "valid_ptr": "*i1", "out_ptr": "*fp32", "n_rows": "i32", "tp": "i32",
        "kk": "i32", "k": "i32", "beta": "fp32", "lambda_head": "fp32", "lambda_tail": "fp32",
    }  # fmt: skip
    for tp, find, all_in, beta0, kk in ((1, False, False, False, 1), (2, True, False, True, 100)):
        tp_pad, kk_pad = tk._next_pow2(tp), tk._next_pow2(kk) if find else 1
        rows = max(1, min(1024, tk.MERGE_TILE // (tp_pad * kk_pad)))
        const = dict(
            FIND_TOPK=find, ALL_IN=all_in, BETA_ZERO=beta0, ROWS=rows, TP_PAD=tp_pad,
            KK_PAD=kk_pad,
        )
        yield f"merge tp={tp} kk={kk}", tk._merge_kernel, merge_types, const, tk.MERGE_NUM_WARPS


class _Cuda:
    type = "cuda"


def _resources(cubin: bytes, cuobjdump: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return "resources: n/a"
    reg, stack, shared, local = m.groups()
    return f"regs {reg:>3}  stack {stack:>5} B  local {local:>5} B  shared {shared:>6} B"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="one shape, bf16 only")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    failures = 0
    for label, fn, types, const, warps in _variants(args.quick):
        t0 = time.perf_counter()
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, types, const), constexprs=const)
            compiled = triton.compile(src, target=target, options={"num_warps": warps})
        except Exception as err:  # noqa: BLE001 - report every variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(err).__name__}: {str(err).splitlines()[-1][:300]}")
            continue
        res = _resources(compiled.asm["cubin"], cuobjdump) if os.path.exists(cuobjdump) else ""
        print(f"ok   {label:<34} {res}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"triton {triton.__version__}, sm_{args.arch}: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
