"""``wsserver-bench``: the project's benchmark (see docs/performance.md)."""
