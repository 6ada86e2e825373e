"""Guest-side entry point: run one scenario module and write its result.

Run in the guest by vmharness.scenarios.run_scenario as
    <venv python> scenario_main.py <module name> <JSON args>
with the project root and vm-tests/ on sys.path. The module `scenarios.<name>` must define
`run(args: dict) -> dict`; the returned dict becomes VmResult.result. An exception becomes
{"_error": "...", "_traceback": "..."} and exit status 1.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

VM_TESTS = Path(__file__).resolve().parent.parent
REPO_ROOT = VM_TESTS.parent
for p in (str(VM_TESTS), str(REPO_ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from vmharness.guest import write_result  # noqa: E402


def main(argv: list[str]) -> int:
    name, raw_args = argv[1], argv[2] if len(argv) > 2 else "{}"
    start = time.monotonic()
    try:
        module = importlib.import_module(f"scenarios.{name}")
        result = module.run(json.loads(raw_args))
        if not isinstance(result, dict):
            raise TypeError(f"scenarios.{name}.run returned {type(result).__name__}, not dict")
        rc = 0
    except BaseException as e:
        traceback.print_exc()
        result = {"_error": f"{type(e).__name__}: {e}", "_traceback": traceback.format_exc()}
        rc = 1
    result.setdefault("_guest_seconds", round(time.monotonic() - start, 3))
    write_result(result)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
