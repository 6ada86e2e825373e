"""Harness self-test: print a marker and hang, so the host's timeout path can be checked."""

import sys
import time


def run(args: dict) -> dict:
    print(args.get("marker", "selftest_sleep: sleeping"), flush=True)
    sys.stdout.flush()
    time.sleep(float(args.get("seconds", 3600)))
    return {}
