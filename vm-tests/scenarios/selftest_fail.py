"""Harness self-test: raise in the guest so the host can check the error path."""


def run(args: dict) -> dict:
    raise RuntimeError(args.get("message", "selftest_fail"))
