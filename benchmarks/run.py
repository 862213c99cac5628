"""Run the shmbus benchmark from a checkout: ``python benchmarks/run.py [--quick] [--json PATH]``.

A thin wrapper: the benchmark itself is ``shmbus._bench`` (``shmbus bench``);
its docstring says what is measured and why.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package is one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shmbus._bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
