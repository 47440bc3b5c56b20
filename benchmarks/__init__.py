"""GRNG benchmark suite: ``python -m benchmarks`` (``grng-bench``) and
``python -m benchmarks.stepcost``. See benchmarks/README.md."""
