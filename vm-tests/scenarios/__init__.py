"""Guest scenarios: each module defines run(args: dict) -> dict and runs as root in the VM.

Run one from the host with vmharness.run_scenario(kernel, "<module>", {...}) (or the
`vm_scenario` pytest fixture). The project root and vm-tests/ are on sys.path, so scenarios
can import the project's packages (fscached, cachefiles, erofs_image, ...). The scratch ext4
disk is at vmharness.guest.scratch_dir() (/mnt); /tmp is a tmpfs; the rest is read-only.
"""
