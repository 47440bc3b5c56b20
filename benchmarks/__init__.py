"""GRNG benchmark suite: ``python -m benchmarks`` and ``python -m benchmarks.stepcost``, run from
the repository root (the suite is not part of the installed ``grng`` distribution). See
benchmarks/README.md."""
