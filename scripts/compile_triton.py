"""Compile every Triton kernel of fastpeft for a GPU architecture, on any machine (no GPU needed).

    python scripts/compile_triton.py [--arch 90]

Triton's CUDA backend lowers each kernel to PTX and runs ptxas for ``sm_<arch>``: a kernel that only ran under the
CPU interpreter (CI) still meets the real compiler, its types, layouts and shared-memory budget. The cases
cover the configurations the host code launches by itself (the fixed ones, and with ``--all`` every autotune
candidate), for fp16, bf16 and fp32 activations, in parallel processes. Prints one line per case; exit status 1
if a required case failed to compile or does not fit the GPU's shared memory.
Running them is scripts/gpu_check.sh's job. Needs TRITON_INTERPRET unset (the script clears it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Iterator

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: kernels must be JIT functions

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Pointer arguments by name: the ones not named here hold the activation dtype.
POINTER_TYPES = {
    "xa_ptr": "*fp32", "v_ptr": "*fp32", "out_scale_ptr": "*fp32", "scalings_ptr": "*fp32", "out_ptr": "*i1",
    "ids_ptr": "*i64", "a_offsets_ptr": "*i32", "ranks_ptr": "*i32", "v_starts_ptr": "*i32",
    "b_starts_ptr": "*i64", "out_starts_ptr": "*i32",
    "w_ptr@qlora": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
    "offset_ptr": "*fp32", "dyb_ptr": "*fp32", "c1_ptr": "*fp32", "c0_ptr": "*fp32", "ids_ptr@bottleneck": "*i32",
    "scale_ptr@bottleneck": "*fp32", "dwd_ptr": "*fp32", "dbd_ptr": "*fp32", "dwu_ptr": "*fp32", "dbu_ptr": "*fp32",
    "dscale_ptr": "*fp32", "dlnw_ptr": "*fp32", "dlnb_ptr": "*fp32",
}  # fmt: skip
FLOAT_SCALARS = {"scaling", "dropout_p", "keep_scale", "ln_eps", "scale_value", "out_ln_eps"}
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def signature(kernel, dtype: str, constexprs: dict) -> dict[str, str]:
    family = kernel.fn.__module__.rsplit(".", 1)[-1]
    qlora = family == "qlora"

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            if f"{name}@{family}" in POINTER_TYPES:
                return POINTER_TYPES[f"{name}@{family}"]
            if qlora and name == "absmax_ptr" and constexprs.get("NESTED"):
                return "*u8"  # the nested state's absmax holds 8-bit codes
            return POINTER_TYPES.get(name, dtype)
        return "fp32" if name in FLOAT_SCALARS else "i32"

    return {name: arg_type(name) for name in kernel.arg_names}


# A case: (name, kernel, constexprs, compile options, required). A required case is a configuration the host
# code launches by itself (fixed configurations, the multi_lora launches); the others are autotune candidates,
# which Triton's autotuner drops when they exceed the GPU's shared memory, so they are reported, not failed.
Case = tuple[str, object, dict, dict, bool]


def lora_cases(precision: str, full: bool) -> Iterator[Case]:
    from fastpeft.triton_kernels import lora

    flags = dict(FUSE_SHRINK=True, DROPOUT_X=False, DROPOUT_OUT=False, HAS_BIAS=True, HAS_OUT_SCALE=False,
                 STORE_Z=False, R_PAD=16, DOT_PRECISION=precision, LORA_PRECISION="tf32" if precision == "tf32"
                 else precision, UPCAST=False)  # fmt: skip
    variants = {
        "fused": {},
        "fused+dropout-x": dict(DROPOUT_X=True, R_PAD=lora.FUSED_MAX_R_PAD),
        "expand r=256": dict(FUSE_SHRINK=False, R_PAD=256),
        "expand+dropout-out": dict(FUSE_SHRINK=False, DROPOUT_OUT=True, HAS_BIAS=False, R_PAD=64),
        "dora": dict(FUSE_SHRINK=False, HAS_OUT_SCALE=True, STORE_Z=True, R_PAD=64),
    }
    fixed = (lora.FIXED_DECODE_CONFIG, lora.FIXED_PREFILL_CONFIG)
    # Every variant on the fixed and the largest tiles; the other autotune tiles with the plain fused kernel
    # (every variant on every tile with full=True).
    for group, configs in (("decode", lora.DECODE_CONFIGS), ("prefill", lora.PREFILL_CONFIGS)):
        for config in [*configs, fixed[group == "prefill"]]:
            is_fixed = config is fixed[group == "prefill"]
            some = is_fixed or config is configs[0] or full
            for variant, changes in variants.items() if some else [("fused", {})]:
                constexprs = {**flags, **changes, **config.kwargs}
                if group == "decode" and constexprs["FUSE_SHRINK"] and config.kwargs["BLOCK_N"] < constexprs["R_PAD"]:
                    continue  # pruned at run time (prune_decode_configs)
                name = f"lora {group} {variant} {'fixed' if is_fixed else config.kwargs}"
                yield name, lora._lora_linear_kernel, constexprs, _options(config), is_fixed
    for config in [*lora.SHRINK_CONFIGS, lora.FIXED_SHRINK_CONFIG]:
        is_fixed = config is lora.FIXED_SHRINK_CONFIG
        for dropout, r_pad in ((False, 256), (True, 64)):
            constexprs = dict(DROPOUT=dropout, SPLIT_K=2, R_PAD=r_pad, DOT_PRECISION=precision, UPCAST=False,
                              **config.kwargs)  # fmt: skip
            name = f"lora shrink dropout={dropout} r={r_pad} {'fixed' if is_fixed else config.kwargs}"
            yield name, lora._lora_shrink_kernel, constexprs, _options(config), is_fixed
    yield "lora keep mask", lora._keep_mask_kernel, dict(BLOCK=32), {}, True


def multi_lora_cases(precision: str, full: bool) -> Iterator[Case]:
    from fastpeft.triton_kernels import multi_lora as ml

    for block_r in (16, 64, 256):
        token = f"multi_lora {{}}/token R={block_r}"
        yield token.format("shrink"), ml._shrink_token_kernel, dict(BLOCK_R=block_r, BLOCK_K=128), {}, True
        yield token.format("expand"), ml._expand_token_kernel, dict(BLOCK_R=block_r, BLOCK_N=128), {}, True
        tile = dict(DOT_PRECISION=precision, BLOCK_M=ml.TILE_M, BLOCK_R=block_r)
        shrink = dict(tile, UPCAST=False, BLOCK_K=ml.TILE_K)
        yield f"multi_lora shrink/tile R={block_r}", ml._shrink_tile_kernel, shrink, ml.TILE_OPTIONS["shrink"], True
        expand = dict(tile, BLOCK_N=ml.TILE_N, DOT_PRECISION=precision if precision == "ieee" else "tf32")
        yield f"multi_lora expand/tile R={block_r}", ml._expand_tile_kernel, expand, ml.TILE_OPTIONS["expand"], True


def qlora_cases(precision: str, full: bool) -> Iterator[Case]:
    import triton.language as tl
    from fastpeft.triton_kernels import qlora as q

    base = dict(LOG2_BLOCKSIZE=6, NESTED=True, LOG2_NESTED=8, W_DTYPE=tl.bfloat16, EVEN_K=True, R_PAD=16,
                DOT_PRECISION=precision, UPCAST=False)  # fmt: skip
    forward = {
        "nested": dict(HAS_BIAS=True, LORA=0),
        "plain absmax, fp16 weight": dict(HAS_BIAS=False, LORA=0, NESTED=False, W_DTYPE=tl.float16),
        "odd K": dict(HAS_BIAS=False, LORA=0, EVEN_K=False),
        "lora xa r=64": dict(HAS_BIAS=True, LORA=1, R_PAD=64),
        "lora fused shrink": dict(HAS_BIAS=False, LORA=2),
        "lora fused shrink, odd K": dict(HAS_BIAS=False, LORA=2, EVEN_K=False),
    }
    backward = {
        "plain": dict(LORA=False),
        "lora r=64": dict(LORA=True, R_PAD=64),
        "odd K": dict(LORA=True, EVEN_K=False),
    }
    groups = (
        ("decode", q.DECODE_CONFIGS, q.FIXED_DECODE_CONFIG),
        ("prefill", q.PREFILL_CONFIGS, q.FIXED_PREFILL_CONFIG),
    )
    for group, configs, fixed in groups:
        for config in [*configs, fixed]:
            is_fixed = config is fixed
            label = "fixed" if is_fixed else config.kwargs
            for kernel, variants, kind in ((q._matmul_4bit_kernel, forward, "forward"),
                                           (q._matmul_4bit_t_kernel, backward, "dx")):  # fmt: skip
                for variant, changes in variants.items() if is_fixed or full else list(variants.items())[:1]:
                    constexprs = {**base, **changes, **config.kwargs}
                    if kernel is q._matmul_4bit_t_kernel:
                        constexprs.pop("HAS_BIAS", None)
                    name = f"qlora {kind} {group} {variant} {label}"
                    yield name, kernel, constexprs, _options(config), is_fixed


def bottleneck_cases(precision: str, full: bool) -> Iterator[Case]:
    import torch
    from fastpeft.triton_kernels import bottleneck as bn

    base = dict(HAS_LN=True, HAS_IDS=True, SCALE_KIND=2, ACT=1, OUT_RES=False, OUT_LN=False, DOT_PRECISION=precision,
                UPCAST=False, BLOCK_M=bn.BLOCK_M, BLOCK_D=bn.BLOCK_D)  # fmt: skip
    variants = {
        "ln ids channel gelu": {},
        "plain relu": dict(HAS_LN=False, HAS_IDS=False, SCALE_KIND=0, ACT=0),
        "add + layernorm after": dict(OUT_RES=True, OUT_LN=True, SCALE_KIND=1),
    }
    variants |= {f"activation {code}": dict(ACT=code) for code in sorted(set(bn.ACTIVATION_CODES.values()))}
    for m_pad in (16, 64, 256):
        for variant, changes in variants.items() if m_pad == 64 or full else list(variants.items())[:3]:
            constexprs = {**base, **changes, "MB_PAD": m_pad}
            yield f"bottleneck {variant} m_pad={m_pad}", bn._bottleneck_kernel, constexprs, {"num_warps": 4}, True
    backward = dict(HAS_LN=True, HAS_IDS=True, SCALE_KIND=2, IDENTITY=True, ACT=1, DOT_PRECISION=precision,
                    UPCAST=False, BLOCK_M=bn.BLOCK_M)  # fmt: skip
    fp32 = precision == "ieee"  # the cases are compiled per activation dtype; fp32 is the one with "ieee" dots
    backward_variants = {
        "ln ids channel": {},
        "plain learned scaling": dict(HAS_LN=False, HAS_IDS=False, SCALE_KIND=1, IDENTITY=False, ACT=0),
        "float scaling": dict(SCALE_KIND=0, ACT=3),
    }
    for m_pad in (16, 64, 256):
        for variant, changes in backward_variants.items():
            block_d = bn.backward_block_d(m_pad, torch.float32 if fp32 else torch.bfloat16)
            constexprs = {**backward, **changes, "MB_PAD": m_pad, "BLOCK_D": block_d}
            name = f"bottleneck backward {variant} m_pad={m_pad}"
            yield name, bn._bottleneck_backward_kernel, constexprs, {"num_warps": 4}, True


def _options(config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


FAMILIES = {
    "lora": lora_cases,
    "multi_lora": multi_lora_cases,
    "qlora": qlora_cases,
    "bottleneck": bottleneck_cases,
}


def cases(family: str, dtype_name: str, every: bool) -> list[Case]:
    precision = "ieee" if dtype_name == "fp32" else "tf32"
    return [case for case in FAMILIES[family](precision, every) if every or case[4]]


def compile_case(job: tuple[str, str, int, bool, int]) -> tuple[str, bool]:
    """(the report line, failed) for case ``index`` of ``cases(family, dtype_name, every)``."""
    family, dtype_name, index, every, arch = job
    name, kernel, constexprs, options, required = cases(family, dtype_name, every)[index]
    source = ASTSource(kernel, signature(kernel, DTYPES[dtype_name], constexprs), constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # report every failing case, not just the first
        return f"FAIL {dtype_name} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", True
    shared = compiled.metadata.shared
    fits = shared <= SHARED_BYTES.get(arch, 99 * 1024)
    verdict = "ok  " if fits else "FAIL" if required else "over"  # over: the autotuner skips it at run time
    return f"{verdict} {dtype_name} {name}: {shared} B shared", required and not fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma list of op families")
    parser.add_argument("--all", action="store_true", help="also every autotune candidate (about 10 CPU-minutes)")
    args = parser.parse_args(argv)
    jobs = [
        (family, dtype_name, index, args.all, args.arch)
        for family in args.families.split(",")
        for dtype_name in DTYPES
        for index in range(len(cases(family, dtype_name, args.all)))
    ]
    failed = 0
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        for line, case_failed in pool.imap(compile_case, jobs):
            failed += case_failed
            print(line, flush=True)
    print(f"compile_triton sm_{args.arch}: {len(jobs)} cases, {'all compiled' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
