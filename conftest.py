"""For every test under tests/ and vm-tests/: a test that cannot run fails; it does not skip.

A skip (pytest.skip, a skipif mark, importorskip) anywhere below is reported as a failure
naming why the test could not run: a missing tool, privilege or kernel feature is something
`make test` must install or the machine must have, never a silent pass. Tests kept out of the
default run on purpose are deselected by their marker (pyproject's addopts), not skipped.
"""
from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        why = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: could not run, and a test that cannot run fails: {why}"
