"""A small true-3D U-Net conditioned on a volume, anisotropic like serial-section EM.

Run:  python examples/volume_3d.py [--steps 10]

The volumes are 8 × 16 × 16 (depth × height × width), with coarse depth as in serial-section
electron microscopy: `resample_axes` makes the first downsampling halve only height and width
and the second all three axes, so depth keeps its few slices longer. The model learns to
restore a clean volume (`x`) from a noisy copy passed as `cond`, which is concatenated to the
noisy sample on channels inside the model. A few steps on a CPU only start that learning; the
point is the shapes and the calls, which are the same for any 3D diffunet model.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import diffunet

SHAPE = (8, 16, 16)


def smooth_volumes(count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` smooth random volumes `(count, 1, *SHAPE)` in [-1, 1]."""
    coarse = torch.randn(count, 1, 3, 5, 5, generator=generator)
    fine = F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)
    return fine / fine.abs().amax(dim=(1, 2, 3, 4), keepdim=True)


def main() -> None:
    """Build, train and sample the 3D model, printing what happened."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (10)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # tiny tensors: a second thread does not pay, and stalls on busy cores
        torch.set_num_threads(1)
    config = diffunet.UNetConfig(
        dims=3,
        in_channels=1,
        cond_channels=1,  # the noisy volume, concatenated to x on channels
        out_channels=1,
        model_channels=16,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        norm_groups=8,
        resample_axes=((1, 2), (0, 1, 2)),  # first H and W only, then all three axes
        attention_resolutions=(4,),  # self-attention at the coarsest level
    )
    model = diffunet.UNet(config).to(device)
    if torch.cuda.is_available():
        diffunet.accelerate(model)  # fused kernels, thin 3D convolutions, CUDA graphs
    print(
        f"3D U-Net: {model.num_parameters():,} parameters on {device}; input sizes must be "
        f"multiples of {config.size_multiple()} (depth, height, width)"
    )

    diffusion = diffunet.Diffusion("cosine", 1000, prediction="x0")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(0)
    start, losses = time.perf_counter(), []
    for _ in range(args.steps):
        clean = smooth_volumes(4, data)
        noisy = clean + 0.3 * torch.randn(clean.shape, generator=data)
        loss = diffusion.loss(model, clean.to(device), cond=noisy.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(
        f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s: "
        f"loss {sum(losses[:5]) / 5:.3f} (first 5) -> {sum(losses[-5:]) / 5:.3f} (last 5)"
    )

    model.eval()
    clean = smooth_volumes(2, data)
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=data)
    restored = diffusion.sample(
        model,
        clean.shape,
        sampler="ddim",
        steps=10,
        cond=noisy.to(device),
        generator=torch.Generator().manual_seed(1),
        progress=False,
    ).cpu()
    print(
        f"sampled {tuple(restored.shape)} given the noisy volumes (DDIM, 10 steps): "
        f"RMS error to the clean volumes {(restored - clean).pow(2).mean().sqrt():.3f}, "
        f"noisy input's {(noisy - clean).pow(2).mean().sqrt():.3f}"
    )


if __name__ == "__main__":
    main()
