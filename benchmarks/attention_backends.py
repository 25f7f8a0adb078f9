#!/usr/bin/env python3
"""A model's attention calls timed under each of PyTorch's SDPA backends: which kernel would
serve each shape best.

    python benchmarks/attention_backends.py --cases sd15,ldm,ddpm-cifar10 --out $OUT/attention_backends.json

`F.scaled_dot_product_attention` picks a backend by a fixed priority, whatever the shape; both
sides of a comparison get that choice. Stable Diffusion 1.5's heads are 40 wide at its first
level (8 heads of 320 channels over 4,096 tokens), a width the kernels handle differently. Each
case's attention calls are found by running its model on the meta device (shapes and call
counts per forward), then each distinct (batch, heads, queries, keys, head width) is timed in
bf16 under the default choice and under each backend alone (`torch.nn.attention.sdpa_kernel`),
and as the accelerator's explicit attention (`explicit`: GEMMs around a float32 softmax):
forward, and forward + backward (CUDA-graph replays), with the queries, keys and values laid
out as the model's `split_heads` leaves them. A backend that cannot run a shape is reported
as such. Each backend's outputs and gradients are checked against the default's. The per-step
totals weight each shape by its calls per forward.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

try:
    import diffunet  # noqa: F401  (installed, or run from a checkout:)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffunet.accel.attention import explicit_attention
from diffunet.model.introspect import example_inputs
from harness.layers import (
    layer_benchmark_parser,
    layer_benchmark_setup,
    time_variants,
    write_json_result,
)
from harness.models import build_case, build_ours

#: The backends timed besides PyTorch's own choice ("default").
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}

#: Not an SDPA backend: the accelerator's own attention by GEMMs around a float32 softmax
#: (`diffunet.accel.attention`), timed at every width.
EXPLICIT = "explicit"

#: (batch, heads, queries, keys, head width) of one attention call.
Shape = tuple[int, int, int, int, int]


class _AttentionShapes(TorchFunctionMode):
    """Counts the shapes of the `F.scaled_dot_product_attention` calls made within it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[Shape] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            batch, heads, queries, width = q.shape
            self.shapes[(batch, heads, queries, k.shape[2], width)] += 1
        return func(*args, **(kwargs or {}))


def attention_calls(case: str, quick: bool) -> Counter[Shape]:
    """Calls per forward of each attention shape in the case's model at its benchmark size."""
    spec = build_case(case, quick)
    model = build_ours(spec.config, "meta")
    x, kwargs = example_inputs(spec.config, spec.batch, spec.size, device="meta")
    if spec.context_tokens:
        kwargs["context"] = torch.empty(
            spec.batch, spec.context_tokens, spec.config.context_dim, device="meta"
        )
    with torch.no_grad(), _AttentionShapes() as recorder:
        model(x, **kwargs)
    return recorder.shapes


def _heads(batch: int, heads: int, tokens: int, width: int, device, dtype) -> torch.Tensor:
    """A (batch, heads, tokens, width) operand laid out as `split_heads` leaves it: a view of
    (batch, tokens, heads · width)."""
    h = torch.randn(batch, tokens, heads * width, device=device, dtype=dtype)
    return h.view(batch, tokens, heads, width).transpose(1, 2).requires_grad_()


def _attend(name: str) -> Callable[..., torch.Tensor]:
    """Attention as `name` ("default", a key of `BACKENDS`, or `EXPLICIT`) computes it."""
    backend = BACKENDS.get(name)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if name == EXPLICIT:  # forward-only calls too, which the model leaves to SDPA
            return explicit_attention(q, k, v)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def measure(shape: Shape, backends: list[str], device, dtype, iters: int) -> list[dict[str, Any]]:
    """One row per backend ("default" first) for attention of `shape`: forward and forward +
    backward milliseconds, and how far its output and gradients are from the default's
    (`harness.layers.time_variants`); a backend with no kernel for the shape, its error."""
    batch, heads, queries, keys, width = shape
    q = _heads(batch, heads, queries, width, device, dtype)
    k, v = (_heads(batch, heads, keys, width, device, dtype) for _ in range(2))
    variants, failed = {}, []
    for name in ["default", *backends]:
        attend = _attend(name)
        try:  # forward and backward: a backend may lack either for the shape
            torch.autograd.grad(attend(q, k, v).sum(), (q, k, v))
        except RuntimeError as err:
            failed.append({"backend": name, "error": str(err).splitlines()[0][:200]})
            continue
        variants[name] = lambda query, attend=attend: attend(query, k, v)
    timed = [
        {"backend": row.pop("variant"), **row}
        for row in time_variants(variants, q, [q, k, v], iters)
    ]
    return [{"shape": list(shape), **row} for row in timed + failed]


def totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per case and backend, milliseconds per forward and per training step over all of the
    case's attention calls (each shape weighted by its calls); a backend that failed on any
    shape has no total."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    failed = {(r["case"], r["backend"]) for r in rows if "error" in r}
    for r in rows:
        if (r["case"], r["backend"]) in failed:
            continue
        total = out.setdefault(r["case"], {}).setdefault(
            r["backend"], {"forward_ms": 0.0, "train_ms": 0.0}
        )
        total["forward_ms"] += r["count"] * r["forward_ms"]
        total["train_ms"] += r["count"] * r["train_ms"]
    return out


def format_rows(rows: list[dict[str, Any]], summed: dict) -> str:
    """The rows and per-case totals as a text table."""
    lines = [
        f"{'case':<14}{'B×H×N×M×d':<22}{'calls':>6}  {'backend':<10}{'fwd ms':>9}"
        f"{'fwd+bwd ms':>12}{'max rel diff':>14}",
        "-" * 87,
    ]
    for r in rows:
        shape = "×".join(str(s) for s in r["shape"])
        head = f"{r['case']:<14}{shape:<22}{r['count']:>6}  {r['backend']:<10}"
        if "error" in r:
            lines.append(head + f"  cannot run it: {r['error'][:60]}")
        else:
            lines.append(
                head + f"{r['forward_ms']:>9.3f}{r['train_ms']:>12.3f}"
                f"{r['max_relative_difference']:>14.1e}"
            )
    for case, by_backend in summed.items():
        for backend, t in by_backend.items():
            lines.append(
                f"{case:<14}{'per step':<22}{'':>6}  {backend:<10}{t['forward_ms']:>9.3f}"
                f"{t['train_ms']:>12.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = layer_benchmark_parser(
        "Time each attention call of a model under each SDPA backend.", "attention_backends.json"
    )
    parser.set_defaults(cases="sd15,ldm,ddpm-cifar10")
    parser.add_argument(
        "--backends",
        default="flash,efficient,cudnn",
        help=f"comma-separated subset of {','.join([*BACKENDS, EXPLICIT])} (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    known = [*BACKENDS, EXPLICIT]
    unknown = sorted(set(backends) - set(known))
    if unknown:
        parser.error(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    device, dtype, meta = layer_benchmark_setup(args, parser)
    rows = []
    for case in args.cases.split(","):
        for shape, count in attention_calls(case, args.quick).items():
            rows += [
                {"case": case, "count": count, **row}
                for row in measure(shape, backends, device, dtype, args.iters)
            ]
    summed = totals(rows)
    print(format_rows(rows, summed), flush=True)
    data = {
        "meta": {**meta, "argv": sys.argv[1:] if argv is None else argv},
        "rows": rows,
        "totals": summed,
    }
    write_json_result(data, args.out, "attention_backends.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
