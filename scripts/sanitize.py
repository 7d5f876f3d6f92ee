"""Every op family's sanitizer cases (scripts/sanitize_<op>.py: small cases that reach each kernel of a backend)
in one process on one forced backend: what scripts/gpu_check.sh runs under compute-sanitizer, one process per
backend, so torch and CUDA start once under the tool rather than once per op.

    compute-sanitizer --tool memcheck python3 scripts/sanitize.py --backend cuda
    python3 scripts/sanitize.py --backends      # the backends some family has cases for

The environment is set as scripts/_sanitize.py says; the exit status is 0 when every case of every family ran on
the backend, finite and near its float64 reference.
"""

from __future__ import annotations

import sys

import _sanitize
import sanitize_bottleneck
import sanitize_dora
import sanitize_lora
import sanitize_multi_lora
import sanitize_qlora

FAMILIES = (sanitize_lora, sanitize_dora, sanitize_multi_lora, sanitize_qlora, sanitize_bottleneck)
# Per backend, (the family's run_case, its case) for every family with cases there.
CASES = {
    backend: [(family.run_case, *case) for family in FAMILIES for case in family.CASES.get(backend, [])]
    for backend in ("cuda", "triton")
}


def run_case(family_run_case, *case, backend: str) -> bool:
    return family_run_case(*case, backend=backend)


def main(argv: list[str] | None = None) -> int:
    return _sanitize.main(__doc__, CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
