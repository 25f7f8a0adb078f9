"""Train the digits network behind `diffunet eval` and write it as safetensors.

    python scripts/train_digits_classifier.py [--out src/diffunet/assets/digits_classifier.safetensors]

Deterministic (fixed seeds, one CPU thread, deterministic algorithms): running it again writes
the same weights. It trains on a stratified 80% of scikit-learn's digits and reports accuracy on
the other 20%, at the 8×8 originals and through the resize round trips (8 → 16 → 8, 8 → 32 → 8)
that evaluation applies to generated digits. Augmentation: a random round trip through
12–32 pixels and a little pixel noise, so the features do not hinge on one interpolation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split

from diffunet.apps.metrics import ASSET, DigitsNet, to_digit_inputs
from diffunet.data.digits import digits_arrays, resize_digits

SEED = 0
EPOCHS = 40
BATCH = 64
LR = 2e-3
ROUND_TRIP_SIZES = (8, 12, 16, 24, 32)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random resize round trip per batch and Gaussian pixel noise (σ = 0.03)."""
    size = ROUND_TRIP_SIZES[int(torch.randint(len(ROUND_TRIP_SIZES), (1,), generator=generator))]
    images = to_digit_inputs(resize_digits(images, size))
    noise = torch.randn(images.shape, generator=generator) * 0.03
    return (images + noise).clamp(0.0, 1.0)


@torch.no_grad()
def accuracy(net: DigitsNet, images: torch.Tensor, labels: torch.Tensor, size: int) -> float:
    """Accuracy on `images` taken through the round trip 8 → size → 8."""
    logits = net(to_digit_inputs(resize_digits(images, size)))
    return float((logits.argmax(dim=1) == labels).float().mean())


def main() -> None:
    """Train, evaluate, write the weights and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSET, help="where to write the safetensors")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)

    images, labels = digits_arrays()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=0.2,
        random_state=SEED,
        stratify=labels.numpy(),
    )
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    net = DigitsNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    steps_per_epoch = len(x_train) // BATCH
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, LR, total_steps=EPOCHS * steps_per_epoch
    )
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            batch = order[i * BATCH : (i + 1) * BATCH]
            loss = F.cross_entropy(net(augment(x_train[batch], generator)), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if (epoch + 1) % 10 == 0:
            net.eval()
            print(
                f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy "
                f"{accuracy(net, x_test, y_test, 8):.4f}",
                flush=True,
            )
    net.eval()
    summary = {
        "held_out_accuracy_8px": accuracy(net, x_test, y_test, 8),
        "held_out_accuracy_16px": accuracy(net, x_test, y_test, 16),
        "held_out_accuracy_32px": accuracy(net, x_test, y_test, 32),
        "train_samples": len(x_train),
        "held_out_samples": len(x_test),
        "epochs": EPOCHS,
        "seed": SEED,
    }
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # One metadata key: safetensors orders several keys arbitrarily, and the file should be
    # byte-for-byte reproducible.
    metadata = {
        "diffunet": json.dumps(
            {"script": "scripts/train_digits_classifier.py", **summary}, sort_keys=True
        )
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    print(json.dumps(summary, indent=2))
    print(f"trained in {time.perf_counter() - start:.1f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
