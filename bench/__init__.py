"""`make bench`: the real service under load, next to the store's own limit.

Entry point: ``python -m bench.run`` (see bench/README.md).
"""
