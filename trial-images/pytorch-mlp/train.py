"""Train a small MLP on scikit-learn's digits and report every epoch to kubetune.

The dataset (1,797 8x8 images of handwritten digits) ships inside
scikit-learn, so a trial downloads nothing. The network runs on CUDA when a
GPU is visible (a trial Pod that requests ``nvidia.com/gpu: 1``) and on the
CPU otherwise. After each epoch it calls ``kubetune.report(step=epoch,
val_loss=..., val_accuracy=...)``: the early-stopping rule sees every epoch
while the trial runs.

    python train.py --lr=0.003 --hidden=128 --layers=2 --dropout=0.1 --epochs=30

SIGTERM (a pruned trial's Pod being deleted) ends it at once with exit status
143, also while torch is still importing and as a container's PID 1, where a
signal without a handler is ignored and the deletion would wait out the Pod's
grace period.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

# The exit status after SIGTERM: 128 + the signal, as a shell reports it.
EXIT_TERMINATED = 128 + signal.SIGTERM


def _stop(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"stopped by SIGTERM\n")  # print() is not safe in a signal handler
    raise SystemExit(EXIT_TERMINATED)


if __name__ == "__main__":
    # Before the heavy imports below: importing torch takes seconds.
    signal.signal(signal.SIGTERM, _stop)

import argparse
import time
from collections.abc import Sequence

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import kubetune


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The hyperparameters, each with a sensible default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64, help="units per hidden layer")
    parser.add_argument("--layers", type=int, default=2, help="hidden layers")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(n_in: int, n_out: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    """An MLP: ``layers`` blocks of Linear, ReLU and Dropout, then a linear head."""
    blocks: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    blocks.append(nn.Linear(width, n_out))
    return nn.Sequential(*blocks)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, reporting validation loss and accuracy after every epoch."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}", flush=True)

    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.data / 16.0,
        digits.target,
        test_size=0.25,
        random_state=args.seed,
        stratify=digits.target,
    )
    # The whole dataset fits in device memory: no DataLoader workers needed.
    xt = torch.tensor(x_train, dtype=torch.float32, device=device)
    yt = torch.tensor(y_train, dtype=torch.long, device=device)
    xv = torch.tensor(x_val, dtype=torch.float32, device=device)
    yv = torch.tensor(y_val, dtype=torch.long, device=device)

    model = build_model(xt.shape[1], 10, args.hidden, args.layers, args.dropout).to(device)
    optimizer: torch.optim.Optimizer
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator(device=device).manual_seed(args.seed)

    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(xt), device=device, generator=generator)
        for i in range(0, len(xt), args.batch_size):
            batch = order[i : i + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(xv)
            val_loss = float(loss_fn(logits, yv))
            val_accuracy = float((logits.argmax(dim=1) == yv).float().mean())
        if val_loss != val_loss:  # NaN: a diverged run; report nothing more and fail.
            print(f"epoch {epoch}: loss diverged (lr={args.lr:g})", flush=True)
            return 1
        kubetune.report(step=epoch, val_loss=val_loss, val_accuracy=val_accuracy)
        print(
            f"epoch {epoch}/{args.epochs} val_loss={val_loss:.4f} val_accuracy={val_accuracy:.4f} "
            f"({time.perf_counter() - started:.2f}s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
