"""benchmarks/kernel_report.md is current (CI fails a kernel change that did not rewrite it), the built CUDA
extension's 16-bit kernels do not spill on sm_90, and the readers behind the report (SASS features, 32-bit offset
products in TTIR, occupancy, the fingerprint) say what they should on known inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import kernel_report  # noqa: E402


def test_reading_the_report_leaves_the_environment_alone():
    """The tests import the report's readers: they must not unset TRITON_INTERPRET (compile_triton.py, a program of
    its own, does), or every later Triton test of the session would find the Triton backend gone."""
    import importlib
    import os

    before = dict(os.environ)
    importlib.reload(kernel_report)
    assert dict(os.environ) == before and "compile_triton" not in sys.modules


def test_the_committed_report_is_current():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = kernel_report.REPORT.read_text()
    assert "Nothing here is measured" in text and "## CUDA extension (csrc/), sm_90" in text
    assert "Triton 3.6" in text  # the GPU machine's Triton, besides CI's


def test_the_fingerprint_follows_every_kernel_source(tmp_path, monkeypatch):
    for entry in kernel_report.INPUTS:
        source = ROOT / entry
        target = tmp_path / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    monkeypatch.setattr(kernel_report, "ROOT", tmp_path)
    before = kernel_report.fingerprint()
    assert before == kernel_report.fingerprint()
    kernel = tmp_path / "triton_kernels" / "lora.py"
    kernel.write_text(kernel.read_text() + "\n# a changed kernel\n")
    assert kernel_report.fingerprint() != before
    (tmp_path / "triton_kernels" / "lora.py").write_text((ROOT / "triton_kernels" / "lora.py").read_text())
    assert kernel_report.fingerprint() == before
    cuda = tmp_path / "csrc" / "lora.cu"
    cuda.write_text(cuda.read_text() + "\n// a changed kernel\n")
    assert kernel_report.fingerprint() != before


def test_the_built_extension_does_not_spill_in_16_bit():
    library = kernel_report.extension_path()
    if library is None or kernel_report.cuobjdump() is None:
        pytest.skip("fastpeft._C is not built here, or no cuobjdump")
    kernels = kernel_report.cuda_kernels(library)
    if not kernels:
        pytest.skip("the extension holds no sm_90 code (FASTPEFT_CUDA_ARCHS without 9.0)")
    names = {k["kernel"].split("<")[0] for k in kernels}
    assert {"lora_gemv_expand_kernel", "multi_lora_shrink_kernel", "gemv_4bit_kernel", "bottleneck_tile_kernel"} <= (
        names
    )
    assert not any("double" in k["kernel"] for k in kernels)  # no fp64 instantiations
    assert kernel_report.cuda_spills(kernels) == []


def test_every_listed_cuda_launch_names_a_kernel_of_the_extension():
    """The target-shape rows of the CUDA table name kernels by their template arguments: a name the extension does
    not hold would print a row of question marks."""
    library = kernel_report.extension_path()
    if library is None or kernel_report.cuobjdump() is None:
        pytest.skip("fastpeft._C is not built here, or no cuobjdump")
    kernels = {k["kernel"] for k in kernel_report.cuda_kernels(library)}
    if not kernels:
        pytest.skip("the extension holds no sm_90 code (FASTPEFT_CUDA_ARCHS without 9.0)")
    assert [name for _, name, *_ in kernel_report.CUDA_TARGET_LAUNCHES if name not in kernels] == []


def test_sass_features_count_what_matters():
    from kernel_facts import sass_features

    sass = """
        /*0090*/                   LDGSTS.E.BYPASS.128 [R5+0x1000], desc[UR4][R2.64], P1 ;
        /*00a0*/              @!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*00b0*/                   LDG.E.U16 R7, desc[UR4][R8.64] ;
        /*00c0*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00d0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*00e0*/                   UTMALDG.2D [UR8], [UR4] ;
        /*00f0*/                   STL.64 [R1], R6 ;
        /*0100*/                   LDGDEPBAR ;
        /*0110*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R3, desc[UR4][R4.64], R9 ;
        /*0120*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R4.64], R9 ;
        /*0130*/                   ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR4][R4.64], R9 ;
        /*0140*/                   ATOMG.E.EXCH.STRONG.GPU PT, R3, desc[UR4][R4.64], RZ ;
        /*0150*/                   PREEXIT ;
        /*0160*/                   ACQBULK ;
    """
    assert sass_features(sass) == {"ldg128": 2, "ldg_narrow": 1, "hgmma": 1, "hmma": 1, "tma": 1, "local": 1,
                                   "float_atomics": 2, "gdc_wait": 1, "gdc_trigger": 1}  # fmt: skip


def test_narrow_offset_products_are_the_32_bit_products_with_a_size_or_stride_argument():
    from kernel_facts import narrow_offset_products

    ttir = """
    %tiles = arith.muli %num_pid_n_6, %c8_i32 : i32 loc(#loc94)
    %a_ptrs_40 = tt.splat %stride_ar : i32 -> tensor<1x16xi32> loc(#loc116)
    %a_ptrs_41 = arith.muli %a_ptrs, %a_ptrs_40 : tensor<1x16xi32> loc(#loc116)
    %x_ptrs_21 = arith.extsi %stride_xm : i32 to i64 loc(#loc110)
    %x_ptrs_22 = tt.splat %x_ptrs_21 : i64 -> tensor<16x1xi64> loc(#loc110)
    %x_ptrs_23 = arith.muli %x_ptrs_20, %x_ptrs_22 : tensor<16x1xi64> loc(#loc110)
    %0 = arith.muli %sample, %T : i32 loc(#loc5)
    """
    found = narrow_offset_products(ttir, {"stride_ar", "stride_xm", "T"})
    assert [line.split(" = ")[0] for line in found] == ["%a_ptrs_41", "%0"]  # the 64-bit product passes


def test_occupancy_follows_registers_shared_memory_and_warps():
    from kernel_facts import occupancy

    assert occupancy(90, 4, 74, 49152) == 4  # shared memory: 228 KB / (48 + 1) KB
    assert occupancy(90, 8, 255, 0) == 1  # registers: 255 x 256 threads
    assert occupancy(90, 4, 32, 0) == 16  # warps: 64 / 4
    assert occupancy(90, 4, 0, 0) == 16
