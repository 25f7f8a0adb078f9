"""Introspection: parameter counts, counted FLOPs, a per-level summary and the self-test."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from diffunet.model.config import UNetConfig
from diffunet.model.presets import list_presets, preset_info
from diffunet.model.unet import UNet


def example_inputs(
    config: UNetConfig,
    batch: int = 1,
    size: tuple[int, ...] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Random `x` and the keyword inputs (`t`, `cond`, `context`, `labels`, `added_cond`,
    `time_ids`) this config needs.

    `size` defaults to `config.image_size`, else the smallest valid size times two. Time ids
    are SDXL's six (sizes and crop offsets) where `added_cond_dim` leaves room for them.
    """
    if size is None:
        size = config.spatial_size() or tuple(2 * m for m in config.size_multiple())

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    x = randn(batch, config.in_channels, *size)
    kwargs: dict = {}
    if config.use_timestep:
        if config.time_embed_type == "noise_level":
            kwargs["t"] = torch.rand(batch, generator=generator).to(device)
        else:
            kwargs["t"] = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    if config.cond_channels:
        kwargs["cond"] = randn(batch, config.cond_channels, *size)
    if config.context_dim:
        kwargs["context"] = randn(batch, 8, config.context_dim)
    if config.num_classes:
        kwargs["labels"] = torch.randint(0, config.num_classes, (batch,), generator=generator).to(
            device
        )
    if config.added_cond_dim is not None:
        width, ids = config.added_cond_dim, 0
        if config.added_time_embed_dim is not None:
            ids = min(6, (width - 1) // config.added_time_embed_dim)
            width -= ids * config.added_time_embed_dim
            sizes = torch.randint(0, 1024, (batch, ids), generator=generator)
            kwargs["time_ids"] = sizes.float().to(device)
        kwargs["added_cond"] = randn(batch, width)
    return x, kwargs


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` that also counts the CPU flash-attention kernels.

    PyTorch registers FLOP formulas for the CUDA attention kernels only, so on the CPU
    `scaled_dot_product_attention` would count as zero; the CPU kernels take the same
    arguments, so they get the same formulas.
    """
    aten = torch.ops.aten

    def same_formula_as(op):
        formula = flop_registry[op]  # already takes tensors (shape-wrapped)

        def count(*args, **kwargs):
            return formula(*args, **kwargs)

        count._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode: do not wrap again
        return count

    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: same_formula_as(
                aten._scaled_dot_product_flash_attention
            ),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: same_formula_as(
                aten._scaled_dot_product_flash_attention_backward
            ),
        },
    )


def count_flops(model: UNet, batch: int = 1, size: tuple[int, ...] | None = None) -> int:
    """FLOPs of one forward pass, counted by `torch.utils.flop_counter` (not estimated).

    Counts the model as it runs: for the architecture's count of an accelerated model, call it
    inside `diffunet.accel.plain(model)`.
    """
    x, kwargs = example_inputs(model.config, batch, size, device=next(model.parameters()).device)
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(x, **kwargs)
    return counter.get_total_flops()


@dataclass(frozen=True)
class LevelSummary:
    """One row of the per-level table."""

    level: int
    resolution: tuple[int, ...] | None
    channels: int
    res_blocks: int
    attention: str


def level_summary(config: UNetConfig) -> list[LevelSummary]:
    """Per-level resolution, channels, ResBlocks (encoder) and attention kind."""
    size = config.spatial_size()
    if size is not None:
        size = tuple(s // config.pool_factor for s in size)
    rows = []
    for level in range(config.num_levels):
        attention = _site(config, config.attention_type, config.transformer_depth_at(level))
        attention = attention if config.attention_at(level) else "-"
        rows.append(
            LevelSummary(
                level, size, config.level_channels(level), config.num_res_blocks, attention
            )
        )
        if size is not None and level < config.num_levels - 1:
            size = tuple(s // f for s, f in zip(size, config.resample_factors(level)))
    return rows


def _site(config: UNetConfig, kind: str, depth: int) -> str:
    """An attention site in words: its kind, or its transformer blocks."""
    if config.uses_transformer and kind != "none":
        return f"transformer ×{depth}"
    return kind


def describe(config: UNetConfig, *, flops: bool = True) -> str:
    """A human-readable report: parameters, FLOPs per forward and the per-level table.

    Both numbers come from shapes alone (a model on the meta device), so a multi-billion
    parameter preset is described in seconds without its memory."""
    with torch.device("meta"):
        model = UNet(config)
    lines = [f"parameters: {model.num_parameters():,}"]
    size = config.spatial_size()
    if flops:
        shown = size or tuple(2 * m for m in config.size_multiple())
        lines.append(f"FLOPs per forward (batch 1, size {shown}): {count_flops(model):,}")
    lines.append("")
    lines.append(f"{'level':>5}  {'resolution':>14}  {'channels':>8}  {'blocks':>6}  attention")
    for row in level_summary(config):
        res = "×".join(map(str, row.resolution)) if row.resolution else "-"
        lines.append(
            f"{row.level:>5}  {res:>14}  {row.channels:>8}  {row.res_blocks:>6}  {row.attention}"
        )
    mid = _site(
        config, config.resolved_mid_attention_type(), config.resolved_mid_transformer_depth()
    )
    lines.append(
        f"{'mid':>5}  {'':>14}  {config.level_channels(config.num_levels - 1):>8}  {2:>6}  {mid}"
    )
    return "\n".join(lines)


def small_config(name: str, dims: int | None = None) -> UNetConfig:
    """A small version of preset `name` (same topology and options) for fast checks."""
    info = preset_info(name)
    config = info.config
    dims = dims or info.dims[0]
    overrides: dict = {
        "dims": dims,
        "model_channels": 16,
        "norm_groups": 8,
        "num_res_blocks": min(config.num_res_blocks, 2),
        "time_embed_input_dim": None,
        "time_embed_dim": None,
        "image_size": None,
    }
    if config.num_head_channels is not None:
        overrides["num_head_channels"] = 8
    else:
        overrides["num_heads"] = min(config.num_heads, 2)
    if config.context_dim is not None:
        overrides["context_dim"] = 12
    if config.transformer_depth is not None:  # at most two blocks per site
        depth = config.transformer_depth
        overrides["transformer_depth"] = (
            min(depth, 2) if isinstance(depth, int) else tuple(min(d, 2) for d in depth)
        )
        if config.mid_transformer_depth is not None:
            overrides["mid_transformer_depth"] = min(config.mid_transformer_depth, 2)
    if config.added_cond_dim is not None:
        ids = config.added_time_embed_dim is not None  # SDXL's 6 ids, at 8 features each
        overrides["added_time_embed_dim"] = 8 if ids else None
        overrides["added_cond_dim"] = 10 + (6 * 8 if ids else 0)
    if config.resample_axes is not None and dims != config.dims:
        overrides["resample_axes"] = None
    return config.replace(**overrides)


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one self-test case."""

    name: str
    dims: int
    parameters: int
    output_shape: tuple[int, ...]
    ok: bool
    seconds: float
    error: str = ""


def self_check(names: list[str] | None = None) -> list[CheckResult]:
    """Build a small version of each preset in every dims it supports; run forward + backward.

    A case passes when the output has the input's spatial shape with `output_channels`
    channels and every parameter receives a finite gradient.
    """
    results = []
    for name in names or list_presets():
        for dims in preset_info(name).dims:
            start = time.perf_counter()
            config = small_config(name, dims)
            model = UNet(config)
            try:
                gen = torch.Generator().manual_seed(0)
                x, kwargs = example_inputs(config, batch=2, generator=gen)
                out = model(x, **kwargs)
                expected = (2, config.output_channels, *x.shape[2:])
                out.square().mean().backward()
                grads_ok = all(
                    p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
                )
                ok = tuple(out.shape) == expected and grads_ok
                error = (
                    "" if ok else f"output {tuple(out.shape)} vs {expected}, grads ok={grads_ok}"
                )
                results.append(
                    CheckResult(
                        name,
                        dims,
                        model.num_parameters(),
                        tuple(out.shape),
                        ok,
                        time.perf_counter() - start,
                        error,
                    )
                )
            except Exception as err:
                results.append(
                    CheckResult(
                        name,
                        dims,
                        model.num_parameters(),
                        (),
                        False,
                        time.perf_counter() - start,
                        f"{type(err).__name__}: {err}",
                    )
                )
    return results


__all__ = [
    "CheckResult",
    "LevelSummary",
    "count_flops",
    "describe",
    "example_inputs",
    "flop_counter",
    "level_summary",
    "self_check",
    "small_config",
]
