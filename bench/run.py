"""`python bench/run.py [--quick] [--json] [--only N ...]`: the benchmark suite (bench/__main__.py).

A script path puts `bench/` itself first on sys.path; the suite is the package `bench`, so
the repository root takes its place, at the end: `modelwatch` is imported as it would be
anywhere else (the editable install, or a copy named by PYTHONPATH, say a prototype).
"""

import os
import runpy
import sys

sys.path.pop(0)
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
runpy.run_module("bench", run_name="__main__", alter_sys=True)
