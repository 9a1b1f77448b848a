"""Process-level helpers shared by the trainer and the processes that launch it. No torch
import: the CLI and the pretrain stage use them without loading torch."""

from __future__ import annotations

import sys


def is_storage_error(e: BaseException) -> bool:
    """An OSError, or an error of the S3 client stack that is not one (botocore, aiohttp)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs")


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies. A stage killed with -9 must not leave
    a launcher or workers behind, writing checkpoints next to the rerun's."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def how_it_ended(exit_code: int) -> str:
    """'was killed by SIGKILL (the out-of-memory killer?)' or 'exited with status 3': how a
    process ended, from a Popen-style exit code (negative: the signal)."""
    import signal

    if exit_code >= 0:
        return f"exited with status {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    return f"was killed by {name}" + (" (the out-of-memory killer?)" if -exit_code == signal.SIGKILL else "")
