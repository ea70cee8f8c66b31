"""Selecting blocks: the fixed, curves and budget rules, stability, cheap rankings and their
agreement with the sweep. Named `selection`, not `select`, to leave that name to the verb.
Imports `core` to `probe`."""
