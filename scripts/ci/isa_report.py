#!/usr/bin/env python
"""The last line of .ci/run: which instruction-set paths of the cpu kernels this CI run tested against the oracle,
and which it could not test on this CPU (with the instructions they need).

Reads the JSON record the test runs wrote (tests/conftest.py, REATT_ISA_REPORT=<file>); exits 1 if the record is
missing or empty (no ISA-forced test ran: the report would be a lie) or if any path failed.
Usage: python scripts/ci/isa_report.py FILE
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.isa import isa_summary  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: isa_report.py FILE", file=sys.stderr)
        return 2
    path = Path(argv[0])
    results = json.loads(path.read_text()) if path.exists() else {}
    if not results:
        print(f"ISA paths tested: none (no ISA-forced test wrote {path}): FAILED")
        return 1
    line = isa_summary(results)
    print(line)
    return 1 if " | FAILED: " in line else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
