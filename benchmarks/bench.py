#!/usr/bin/env python3
"""diffunet vs diffusers / MONAI on one GPU: `python benchmarks/bench.py --help`.

The code lives in `diffunet.benchmark` (also `diffunet bench`); this script only makes it
runnable from a checkout without installing diffunet (it puts `src/` on the path).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from diffunet.benchmark import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from diffunet.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
