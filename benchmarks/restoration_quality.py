"""Restoration quality of diffunet on held-out pictures, against the noisy input and NLM.

Trains reduced-width EMDiffuse models on the embedded EM-like pairs
(:mod:`diffunet.data.em_pairs`: scikit-image pictures with Poisson–Gaussian noise, 64² random
aligned crops), then restores the two held-out pictures (`coins`, `page`) whole, through the
same code path as `diffunet restore` (tiles of the training crop, overlap 16), and reports:

- PSNR and SSIM (`skimage.metrics`, data range 1) of the noisy input, of non-local means
  (`skimage.restoration.denoise_nl_means`, h = 0.8 σ̂, 5×5 patches, 13×13 search, σ̂ from the
  median absolute Haar-diagonal coefficient, i.e. `estimate_sigma` without PyWavelets), and of
  diffunet;
- how well the uncertainty map finds the errors: Spearman's ρ between the per-pixel
  uncertainty and the absolute error (`scipy.stats.spearmanr`) and the share of the total
  absolute error held by the 10 % most uncertain pixels (10 % if unrelated).

Models (each a run folder that `diffunet restore --from` takes):

- `emdiffuse`: MSE-trained; diffunet = mean of K samples, uncertainty = their std (EMDiffuse);
- `emdiffuse-aleatoric`: Gaussian-NLL-trained; evaluated both ways: its predicted mean and
  standard deviation (one evaluation per draw), and the mean/std of K samples.

Then a small 3D check: a tiny `emdiffuse-3d` trained on random crops of a smoothed
`binary_blobs(n_dim=3)` volume with the same noise, evaluated on another volume.

    python benchmarks/restoration_quality.py --out runs/restoration-quality

Everything is seeded. `--threads` defaults to 1: on a small shared machine, threads wait for
each other whenever another process holds a core. Results: `results.json` and `table.md` in
`--out`, figures in `--figures` (default docs/images).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage.restoration import denoise_nl_means

from diffunet.apps.generate import load_model
from diffunet.apps.restoration_quality import quality, uncertainty_quality
from diffunet.cli.restore import restore_pixels
from diffunet.data import TensorDataset
from diffunet.data.em_pairs import EMPairs, PoissonGaussianNoise, blob_volume
from diffunet.model.checkpoint import atomic_write_bytes
from diffunet.training.distributed import DistInfo
from diffunet.training.run_config import (
    DataSection,
    DiffusionSection,
    RunConfig,
    SampleSection,
    TrainSection,
)
from diffunet.training.trainer import CONFIG_YAML, Trainer, resolve_precision

#: The reduced-width EMDiffuse used here (the preset has model_channels 32, 2 res blocks,
#: dropout 0.2: 15.7M parameters, too slow to train on a 2-core CPU in minutes).
MODEL_2D = {
    "model_channels": 16,
    "channel_mult": [1, 2, 4, 8],
    "num_res_blocks": 1,
    "norm_groups": 8,
    "num_head_channels": 32,
    "dropout": 0.0,
}
MODEL_3D = {
    "model_channels": 16,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "norm_groups": 8,
    "num_head_channels": 32,
    "dropout": 0.0,
}


# ---------------------------------------------------------------------------- metrics
# PSNR / SSIM (`quality`) and the uncertainty scores (`uncertainty_quality`) are the library's
# (diffunet.apps.restoration_quality), the ones `diffunet restore --target` prints.
def haar_sigma(image: np.ndarray) -> float:
    """Noise σ from the median absolute finest diagonal Haar coefficient (Donoho's MAD rule),
    over the last two axes (every slice of a volume)."""
    h, w = (image.shape[-2] // 2) * 2, (image.shape[-1] // 2) * 2
    x = image[..., :h, :w].astype(np.float64)
    diagonal = (
        x[..., 0::2, 0::2] - x[..., 1::2, 0::2] - x[..., 0::2, 1::2] + x[..., 1::2, 1::2]
    ) / 2
    return float(np.median(np.abs(diagonal)) / 0.6745)


def nl_means(noisy: np.ndarray) -> np.ndarray:
    """The classical baseline: scikit-image's non-local means with an estimated σ (2D or 3D)."""
    sigma = haar_sigma(noisy)
    return denoise_nl_means(
        noisy, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
    ).astype(np.float32)


# ---------------------------------------------------------------------------- training
def train(
    name: str,
    preset: str,
    data: TensorDataset,
    model: dict[str, Any],
    args,
    out: Path,
    *,
    steps: int,
    batch_size: int,
    prediction: str,
) -> Path:
    """Train `preset` (+ `model` overrides) on `data` with the library's Trainer; the run folder."""
    run = RunConfig(
        preset=preset,
        model=dict(model),
        data=DataSection(source=data.source, image_size=None),
        diffusion=DiffusionSection(schedule=args.schedule, timesteps=1000, prediction=prediction),
        train=TrainSection(
            steps=steps,
            batch_size=batch_size,
            lr=args.lr,
            seed=args.seed,
            precision=args.precision,
            device=args.device,
            ema_decay=args.ema_decay,
            warmup=min(50, steps // 10),
            checkpoint_every=0,
            sample_every=0,
            log_every=max(1, steps // 10),
            threads=args.threads,
            eval=False,
        ),
        sample=SampleSection(sampler=args.sampler, steps=args.sample_steps),
    )
    run.validate()
    run_dir = out / name
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    trainer = Trainer(run, data, run_dir, DistInfo(device=device), stream=sys.stdout)
    run.model = trainer.model_config.to_dict()
    run_dir.mkdir(parents=True, exist_ok=True)
    text = run.to_yaml()
    atomic_write_bytes(run_dir / CONFIG_YAML, lambda tmp: Path(tmp).write_text(text))
    result = trainer.train()
    print(
        f"{name}: {result.steps} steps in {result.seconds:.0f} s "
        f"({trainer.model.num_parameters():,} parameters)",
        flush=True,
    )
    return run_dir


def crops_3d(
    volume: np.ndarray, count: int, size: int, noise: PoissonGaussianNoise, seed: int
) -> TensorDataset:
    """`count` random aligned (noisy, clean) cubes of side `size` from `volume`, with flips."""
    rng = np.random.default_rng(seed)
    clean = np.empty((count, 1, size, size, size), dtype=np.float32)
    for i in range(count):
        corner = [rng.integers(0, s - size + 1) for s in volume.shape]
        cube = volume[tuple(slice(c, c + size) for c in corner)]
        for axis in range(3):
            if rng.integers(2):
                cube = np.flip(cube, axis)
        clean[i, 0] = cube
    noisy = noise(clean, rng)
    return TensorDataset(
        x=torch.from_numpy(clean),
        cond=torch.from_numpy(noisy),
        source="blobs-3d",
        extra={"value_range": [0, 1], "cond_value_range": [0, 1]},
    )


# ---------------------------------------------------------------------------- evaluation
def evaluate(
    run_dir: Path, pairs, *, kind: str, args, eta: float = 0.0
) -> tuple[dict, dict[str, np.ndarray]]:
    """Restore every held-out pair through the CLI path; metrics per picture and the images."""
    loaded = load_model(run_dir, device="cuda" if args.device == "cuda" else "cpu")
    results, images = {}, {}
    for pair in pairs:
        started = time.perf_counter()
        restored, std = restore_pixels(
            loaded,
            pair.noisy,
            kind=kind,
            samples=args.samples,
            steps=args.sample_steps,
            sampler=args.sampler,
            eta=eta,
            seed=args.seed,
            progress=False,
        )
        seconds = time.perf_counter() - started
        results[pair.name] = {
            **quality(pair.clean, restored),
            **uncertainty_quality(pair.clean, restored, std),
            "seconds": round(seconds, 1),
        }
        images[pair.name] = (restored, std)
        print(f"  {run_dir.name} [{kind}, η={eta:g}] {pair.name}: {results[pair.name]}", flush=True)
    return results, images


def panel_figure(path: Path, columns: list[tuple[str, np.ndarray]], scale: int = 1) -> None:
    """Labelled grey panels side by side (each normalised as given: values in [0, 1])."""
    label_height, gap = 14, 4
    h, w = columns[0][1].shape
    canvas = Image.new("L", (len(columns) * (w * scale + gap) - gap, h * scale + label_height), 255)
    draw = ImageDraw.Draw(canvas)
    for index, (label, image) in enumerate(columns):
        tile = Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))
        if scale > 1:
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        left = index * (w * scale + gap)
        canvas.paste(tile, (left, label_height))
        draw.text((left + 2, 1), label, fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def normalised(std: np.ndarray) -> np.ndarray:
    """A map scaled so its 99.5th percentile is 1 (for display)."""
    top = float(np.percentile(std, 99.5))
    return std / top if top > 0 else std


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (defaults: the recorded run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/restoration-quality", help="run folders and results")
    p.add_argument("--figures", default="docs/images", help="where the figures go")
    p.add_argument(
        "--models",
        default="emdiffuse,emdiffuse-aleatoric",
        help="comma-separated presets to train (emdiffuse, emdiffuse-aleatoric)",
    )
    p.add_argument("--steps", type=int, default=1200, help="training steps per 2D model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=64, help="training crop side")
    p.add_argument("--pairs", type=int, default=8192, help="training pairs (random crops)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument(
        "--prediction",
        default="v",
        choices=("eps", "x0", "v"),
        help="v (default): its samples' spread tracks the error; x0 collapses it",
    )
    p.add_argument("--schedule", default="cosine", choices=("linear", "cosine", "sigmoid"))
    p.add_argument("--samples", type=int, default=8, help="K samples per input")
    p.add_argument("--sample-steps", type=int, default=10, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim", "dpm++"))
    p.add_argument(
        "--etas",
        default="0",
        help="DDIM η values to evaluate the sampled restorations with, e.g. 0,1 "
        "(η = 1: fresh noise at every step, like DDPM)",
    )
    p.add_argument(
        "--width",
        default="reduced",
        choices=("reduced", "preset"),
        help="reduced: the small models above (CPU); preset: the presets as they are",
    )
    p.add_argument("--steps-3d", type=int, default=150, help="training steps of the 3D check")
    p.add_argument("--skip-3d", action="store_true")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, write results and figures."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out, figures = Path(args.out), Path(args.figures)
    source = EMPairs(crop=args.crop)
    pairs = source.evaluation_pairs()
    data = source.dataset(args.pairs, seed=args.seed)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "noise": source.noise.describe(),
        "held_out": list(source.held_out_names),
        "train_images": list(source.train_names),
        "methods": {},
        "precision": resolve_precision(args.precision, torch.device(args.device)),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }
    methods = report["methods"]
    methods["noisy input"] = {p.name: quality(p.clean, p.noisy) for p in pairs}
    nlm = {p.name: nl_means(p.noisy) for p in pairs}
    methods["non-local means"] = {p.name: quality(p.clean, nlm[p.name]) for p in pairs}
    shown: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    train_seconds = {}
    for preset in [m for m in args.models.split(",") if m]:
        t0 = time.perf_counter()
        overrides = MODEL_2D if args.width == "reduced" else {}
        run_dir = train(
            preset,
            preset,
            data,
            overrides,
            args,
            out,
            steps=args.steps,
            batch_size=args.batch_size,
            prediction=args.prediction,
        )
        train_seconds[preset] = round(time.perf_counter() - t0, 1)
        etas = [float(e) for e in args.etas.split(",")]
        kinds = [("samples", eta) for eta in etas]
        if preset.endswith("aleatoric"):
            kinds.append(("aleatoric", 0.0))
        for kind, eta in kinds:
            label = f"diffunet {preset} ({kind}" + (
                f", η={eta:g})" if len(etas) > 1 and kind == "samples" else ")"
            )
            methods[label], images = evaluate(run_dir, pairs, kind=kind, eta=eta, args=args)
            if (preset == "emdiffuse" and eta == etas[0]) or not shown:
                shown = images
    report["train_seconds"] = train_seconds

    for pair in pairs:
        if pair.name in shown:
            restored, std = shown[pair.name]
            panel_figure(
                figures / f"restoration_{pair.name}.png",
                [
                    ("noisy input", pair.noisy),
                    ("non-local means", nlm[pair.name]),
                    ("diffunet (mean of K)", restored),
                    ("clean", pair.clean),
                    ("uncertainty (std)", normalised(std)),
                    ("|error|", normalised(np.abs(restored - pair.clean))),
                ],
            )

    if not args.skip_3d:
        report["3d"] = check_3d(args, out, figures)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (out / "table.md").write_text(table)
    print(table)
    print(f"wall time {report['wall_seconds']:.0f} s; results in {out / 'results.json'}")
    return 0


def check_3d(args, out: Path, figures: Path) -> dict[str, Any]:
    """Train a tiny 3D model on noisy blob volumes; PSNR of noisy vs restored on a new volume."""
    noise = PoissonGaussianNoise()
    t0 = time.perf_counter()
    data = crops_3d(blob_volume(64, seed=0), 1024, 16, noise, seed=args.seed)
    run_dir = train(
        "emdiffuse-3d",
        "emdiffuse-3d",
        data,
        MODEL_3D,
        args,
        out,
        steps=args.steps_3d,
        batch_size=8,
        prediction=args.prediction,
    )
    clean = blob_volume(32, seed=1)
    noisy = noise(clean, np.random.default_rng(99))
    loaded = load_model(run_dir, device="cuda" if args.device == "cuda" else "cpu")
    restored, std = restore_pixels(
        loaded,
        noisy,
        kind="samples",
        samples=4,
        steps=args.sample_steps,
        sampler=args.sampler,
        seed=args.seed,
        progress=False,
    )
    mse = {
        name: float(np.mean((np.clip(v, 0, 1) - clean) ** 2))
        for name, v in (("noisy", noisy), ("nlm", nl_means(noisy)), ("restored", restored))
    }
    result = {name + "_psnr": float(10 * np.log10(1.0 / m)) for name, m in mse.items()}
    result.update(uncertainty_quality(clean, restored, std))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    middle = clean.shape[0] // 2
    panel_figure(
        figures / "restoration_3d.png",
        [
            ("noisy", noisy[middle]),
            ("restored", restored[middle]),
            ("clean", clean[middle]),
            ("std", normalised(std)[middle]),
        ],
        scale=4,
    )
    print(f"3D check: {result}", flush=True)
    return result


def markdown_table(report: dict[str, Any]) -> str:
    """The results as the markdown table recorded in docs/restoration.md."""
    names = report["held_out"]
    header = (
        "| method | "
        + " | ".join(f"{n} PSNR / SSIM" for n in names)
        + " | mean PSNR | ρ(unc., \\|err\\|) | top-10 % error share |\n"
    )
    header += "|---" * (len(names) + 4) + "|\n"
    rows = []
    for method, per in report["methods"].items():
        cells = [f"{per[n]['psnr']:.2f} / {per[n]['ssim']:.3f}" for n in names]
        mean_psnr = np.mean([per[n]["psnr"] for n in names])
        if "spearman" in per[names[0]]:
            rho = " / ".join(f"{per[n]['spearman']:.2f}" for n in names)
            share = " / ".join(f"{per[n]['top10_error_share']:.0%}" for n in names)
        else:
            rho = share = "–"
        rows.append(
            f"| {method} | " + " | ".join(cells) + f" | {mean_psnr:.2f} | {rho} | {share} |"
        )
    text = header + "\n".join(rows) + "\n"
    if "3d" in report:
        r = report["3d"]
        text += (
            f"\n3D check (32³ blob volume, PSNR): noisy {r['noisy_psnr']:.2f} dB, 3D "
            f"non-local means {r['nlm_psnr']:.2f} dB, diffunet {r['restored_psnr']:.2f} dB; "
            f"ρ = {r['spearman']:.2f}, top-10 % error share {r['top10_error_share']:.0%}\n"
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
