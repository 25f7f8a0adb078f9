"""Convert another library's U-Net weights into a diffunet checkpoint folder
(`config.json` + `model.safetensors`).

  diffunet convert --from diffusers SRC --out DST
      SRC: a folder saved by diffusers' `UNet2DModel` / `UNet2DConditionModel.save_pretrained`
      (or a pipeline folder with `unet/`). The config is translated exactly, or the command
      names the option that diffunet cannot express.
  diffunet convert --from stable-diffusion SRC [--config sd15] [--ema] --out DST
      SRC: an original Stable Diffusion single-file checkpoint (`.safetensors`, or a `.ckpt`
      read with `weights_only=True`); its U-Net is imported. SD 1.x, 2.x and XL are recognised
      (--config names the preset or config.json of any other network); --ema takes the EMA
      copy of a CompVis training checkpoint.
  diffunet convert --from guided-diffusion SRC --config emdiffuse --out DST
      SRC: a guided-diffusion / Palette / EMDiffuse state dict (`.safetensors`, or a PyTorch
      file read with `weights_only=True`); --config names the preset or config.json of the
      same network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffunet.cli.info import resolve_config
from diffunet.errors import InvalidValueError
from diffunet.model.checkpoint import save_pretrained

SOURCES = ("diffusers", "stable-diffusion", "guided-diffusion")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffunet convert`."""
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=SOURCES,
        required=True,
        help="layout of the source weights",
    )
    parser.add_argument(
        "src", help="source folder (diffusers) or weights file (stable-diffusion, guided-diffusion)"
    )
    parser.add_argument("--out", required=True, help="destination checkpoint folder")
    parser.add_argument("--subfolder", help="diffusers: the model's subfolder (default: auto)")
    parser.add_argument(
        "--config",
        help="guided-diffusion: preset name or config.json of the network (e.g. emdiffuse); "
        "stable-diffusion: the same, for a network other than sd15 / sd21 / sdxl",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="stable-diffusion: import the EMA copy of a CompVis training checkpoint",
    )
    parser.add_argument(
        "--attention-order",
        choices=("legacy", "new"),
        default="legacy",
        help="guided-diffusion: qkv head order (use_new_attention_order=True "
        "is 'new'; default legacy)",
    )
    parser.add_argument(
        "--x-first",
        action="store_true",
        help="guided-diffusion: the original concatenates x before the condition "
        "(default: condition first, as EMDiffuse/Palette)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    """Convert, save and print a one-line summary."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise InvalidValueError(f"--out {out} is not empty; pass --force to overwrite it")
    if args.ema and args.source_format != "stable-diffusion":
        raise InvalidValueError("--ema is only for --from stable-diffusion")
    if args.source_format == "diffusers":
        from diffunet.interop.diffusers import from_diffusers

        if args.config:
            raise InvalidValueError(
                "--config is only for --from guided-diffusion or stable-diffusion (diffusers "
                "folders carry their own config)"
            )
        model = from_diffusers(args.src, subfolder=args.subfolder)
    elif args.source_format == "stable-diffusion":
        from diffunet.interop.stable_diffusion import from_stable_diffusion

        config = resolve_config(args.config) if args.config else None
        model = from_stable_diffusion(args.src, config, ema=args.ema)
    else:
        from diffunet.interop.guided_diffusion import from_guided_diffusion

        if not args.config:
            raise InvalidValueError(
                "--from guided-diffusion needs --config (a preset name or "
                "config.json describing the network, e.g. --config emdiffuse)"
            )
        model = from_guided_diffusion(
            args.src,
            resolve_config(args.config),
            attention_order=args.attention_order,
            cond_first=not args.x_first,
        )
    save_pretrained(model, out)
    summary = {
        "source": str(args.src),
        "from": args.source_format,
        "out": str(out),
        "parameters": model.num_parameters(),
    }
    print(json.dumps(summary))
    return 0
