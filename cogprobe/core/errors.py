"""One exception type for every mistake a user can fix.

The CLI prints a `CogprobeError` as a single line (`cogprobe: error: ...`) and
exits non-zero; anything else is a bug and keeps its traceback. So every
message should name the problem *and* the fix.
"""


class CogprobeError(Exception):
    """A user-facing error: bad input, a missing file, an impossible request."""
