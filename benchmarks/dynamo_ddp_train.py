#!/usr/bin/env python3
"""`diffunet train` with a chosen Dynamo strategy for compiled DDP (benchmarks only).

    torchrun --nproc_per_node=2 benchmarks/dynamo_ddp_train.py no_optimization train ...

`ddp_optimizer` (PyTorch's default) splits the compiled graph at DDP's bucket boundaries so
that gradient all-reduces overlap the backward; `no_optimization` compiles one graph and
all-reduces after it. `ddp_scaling.py --dynamo-ddp` launches the trainer through this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch._dynamo

#: The values of `torch._dynamo.config.optimize_ddp` this launcher takes.
STRATEGIES = ("ddp_optimizer", "no_optimization")


def configure(strategy: str) -> None:
    """Set Dynamo's compiled-DDP strategy for this process."""
    if strategy not in STRATEGIES:
        raise SystemExit(
            f"dynamo_ddp_train.py: unknown strategy {strategy!r}; choose from "
            f"{', '.join(STRATEGIES)}"
        )
    torch._dynamo.config.optimize_ddp = strategy


def main(argv: list[str]) -> int:
    """`STRATEGY ARGS...`: configure Dynamo, then run the diffunet CLI with ARGS."""
    if not argv:
        raise SystemExit(f"usage: dynamo_ddp_train.py {{{','.join(STRATEGIES)}}} train ...")
    configure(argv[0])
    try:
        from diffunet.cli import main as diffunet_main
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from diffunet.cli import main as diffunet_main
    return diffunet_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
