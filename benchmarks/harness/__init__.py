"""The side-by-side benchmark harness (issue 6): tasks, methods, training, measurements and records.

Entry points are `benchmarks/run.py` (runs, one JSON line each) and `benchmarks/report.py` (table and plots).
"""
