"""User-facing errors.

Anything the user can fix (a config value, a path, a missing or corrupt artifact) raises
`StackWiseError` with one line naming the bad value and what is allowed. The CLIs print that
line and exit non-zero without a traceback; everything else is a bug and keeps its traceback.
"""

import errno as _errno


class StackWiseError(Exception):
    """A user error: bad config value, missing/corrupt artifact, bad input file."""


class ConfigError(StackWiseError, ValueError):
    """A config value is invalid. `field` is the dotted name of the offending value."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ArtifactError(StackWiseError):
    """An artifact (checkpoint, cache, manifest) is missing, incomplete, corrupt or foreign."""


class ArtifactWriteError(ArtifactError):
    """The operating system refused a write (no space left, quota, read-only file system, permission
    denied, file too large): a problem of the disk the artifacts go to, not of StackWise.

    `path` is the file (or folder) being written and `errno` the OS error number (None when the OS
    gave none); the message says what to do about it.
    """

    def __init__(self, path: object, errno: int | None, detail: str = ""):
        self.path, self.errno, self.detail = path, errno, detail
        name = _errno.errorcode.get(errno, "") if errno is not None else ""
        reason, hint = _WRITE_HINTS.get(errno, (detail or "the write failed", "check that disk, then rerun"))
        super().__init__(f"cannot write {path}: {reason}{f' ({name})' if name else ''}; {hint}")

    def __reduce__(self):  # pickles (a DataLoader worker, a spawned rank) with its own arguments
        return type(self), (self.path, self.errno, self.detail)


class ExperimentBusyError(StackWiseError):
    """Another run holds the experiment folder's lock (stackwise/lock.py)."""


_ELSEWHERE = "or write elsewhere (stackwise-train: output_root=DIR), then rerun the same command"
_NOT_WRITABLE = f"make the folder writable for this user {_ELSEWHERE}"
_WRITE_HINTS = {
    _errno.ENOSPC: ("no space left on device", f"free space on that disk {_ELSEWHERE}"),
    _errno.EDQUOT: ("disk quota exceeded", f"free space within your quota {_ELSEWHERE}"),
    _errno.EROFS: ("read-only file system, not writable", f"remount it read-write {_ELSEWHERE}"),
    _errno.EACCES: ("permission denied, not writable", _NOT_WRITABLE),
    _errno.EPERM: ("operation not permitted, not writable", _NOT_WRITABLE),
    _errno.EFBIG: ("file too large for this file system or ulimit -f", f"lower cache.shard_size {_ELSEWHERE}"),
}
