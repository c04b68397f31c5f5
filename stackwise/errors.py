"""User-facing errors.

Anything the user can fix (a config value, a path, a missing or corrupt artifact) raises
`StackWiseError` with one line naming the bad value and what is allowed. The CLIs print that
line and exit non-zero without a traceback; everything else is a bug and keeps its traceback.
"""


class StackWiseError(Exception):
    """A user error: bad config value, missing/corrupt artifact, bad input file."""


class ConfigError(StackWiseError, ValueError):
    """A config value is invalid. `field` is the dotted name of the offending value."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ArtifactError(StackWiseError):
    """An artifact (checkpoint, cache, manifest) is missing, incomplete, corrupt or foreign."""
