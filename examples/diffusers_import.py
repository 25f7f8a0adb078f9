"""Import a diffusers `UNet2DModel` into diffunet and check that both give the same outputs.

Run:  python examples/diffusers_import.py      (needs diffusers: pip install 'diffunet[diffusers]')

A tiny `UNet2DModel` is built with random weights (no download), converted with
`diffunet.from_diffusers` into the equivalent `UNetConfig` and weights, and both models are
called on the same inputs. The same call takes a folder written by diffusers'
`save_pretrained` (or a pipeline folder with a `unet/` subfolder), e.g. google/ddpm-cifar10-32,
which becomes the `ddpm-cifar10` preset exactly; `diffunet convert --from diffusers` does it
from the command line.
"""

from __future__ import annotations

import sys

import torch

import diffunet


def main() -> None:
    """Build a random diffusers model, convert it, compare outputs, print the numbers."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        sys.exit(
            "this example needs diffusers, an optional extra: pip install 'diffunet[diffusers]'"
        )

    torch.manual_seed(0)
    reference = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=4,
    ).eval()
    # Fresh norms have weight 1 and bias 0; perturb every weight so that a mix-up would show.
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))

    model = diffunet.from_diffusers(reference)
    if torch.cuda.is_available():
        model = model.cuda()
        diffunet.accelerate(model)  # fused kernels and CUDA graphs; same weights and outputs
    print(
        f"diffusers UNet2DModel: {sum(p.numel() for p in reference.parameters()):,} parameters; "
        f"diffunet UNet: {model.num_parameters():,} (+{model.config.resolved_time_embed_dim()} "
        "for the null label that classifier-free guidance uses)"
    )
    print(
        f"config: model_channels={model.config.model_channels}, "
        f"channel_mult={model.config.channel_mult}, num_res_blocks={model.config.num_res_blocks}, "
        f"attention_resolutions={model.config.attention_resolutions}, "
        f"num_classes={model.config.num_classes}"
    )

    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 900])
    labels = torch.tensor([0, 3])
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = reference(x, t, class_labels=labels).sample
        got = model(x.to(device), t.to(device), labels=labels.to(device)).cpu()
    error = (got - expected).abs().max() / expected.abs().max()
    print(f"outputs {tuple(got.shape)}: largest difference {error:.1e} of the largest value")
    if error > 1e-4:
        sys.exit(f"outputs differ by {error:.1e}: the conversion is wrong")


if __name__ == "__main__":
    main()
