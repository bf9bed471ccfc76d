"""kvbm benchmarks: ``python -m bench.<name>``; each prints a table with its floor measured in
the same run. Not collected by pytest (no ``test_`` modules)."""
