"""Exceptions raised at the library's boundaries.

Every error names the input that was wrong and, where there is one, the fix. They subclass the
built-in exception a caller would naturally catch (ValueError, FileNotFoundError, ...) so generic
handlers keep working.
"""


class ConfigError(ValueError):
    """An invalid configuration value (the message names the field and the valid range)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing/unexpected/mis-shaped tensors, corrupt files."""


class StorageError(OSError):
    """Storage (a local folder or an object store) that cannot be reached, read or written."""


class DataError(ValueError):
    """A dataset row or file that cannot be used (the message names the file and row)."""
