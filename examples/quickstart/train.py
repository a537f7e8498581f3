"""The quickstart trial: a small numpy MLP on synthetic data, on the CPU, with no downloads.

Classifies points whose labels come from a fixed random "teacher" network (the
same data for every trial, generated from a seed), so the best
hyperparameters are not obvious and a bad learning rate really is bad. Reports
``val_loss`` and ``val_accuracy`` after every epoch with ``kubetune.report``,
which is what early stopping (ASHA) judges.

Run it by hand to try it::

    python examples/quickstart/train.py --lr=0.01 --hidden=32 --optimizer=adam --epochs=5
"""

from __future__ import annotations

import os

# One BLAS thread per trial: kubetune runs `parallelism` trials side by side,
# and each grabbing every core would only make them fight.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

import kubetune  # noqa: E402

N_TRAIN, N_VAL, DIM, CLASSES, BATCH = 12000, 2000, 12, 4, 64


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs and labels from a random two-layer teacher network, with label noise."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(DIM, 16)) / math.sqrt(DIM)
    w2 = rng.normal(size=(16, CLASSES)) * 1.5
    x = rng.normal(size=(N_TRAIN + N_VAL, DIM))
    logits = np.tanh(x @ w1 * 1.5) @ w2
    # Gumbel noise: sampling labels from the teacher's softmax, so no model is perfect.
    y = np.argmax(logits + rng.gumbel(size=logits.shape) * 0.2, axis=1)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -float(log_probs[np.arange(len(y)), y].mean())
    grad = np.exp(log_probs)
    grad[np.arange(len(y)), y] -= 1.0
    return loss, grad / len(y)


def main() -> None:
    """Train, reporting validation loss and accuracy every epoch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    # Only sgd trials get --momentum (a conditional parameter); adam ones keep the default.
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=27)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x_train, y_train, x_val, y_val = make_data()
    rng = np.random.default_rng(args.seed)
    params = {
        "w1": rng.normal(size=(DIM, args.hidden)) * math.sqrt(2.0 / DIM),
        "b1": np.zeros(args.hidden),
        "w2": rng.normal(size=(args.hidden, CLASSES)) * math.sqrt(1.0 / args.hidden),
        "b2": np.zeros(CLASSES),
    }
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    t = 0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(N_TRAIN)
        for start in range(0, N_TRAIN, BATCH):
            idx = order[start : start + BATCH]
            xb, yb = x_train[idx], y_train[idx]
            hidden = np.maximum(0.0, xb @ params["w1"] + params["b1"])
            _, grad_logits = cross_entropy(hidden @ params["w2"] + params["b2"], yb)
            grad_hidden = (grad_logits @ params["w2"].T) * (hidden > 0)
            grads = {
                "w1": xb.T @ grad_hidden,
                "b1": grad_hidden.sum(axis=0),
                "w2": hidden.T @ grad_logits,
                "b2": grad_logits.sum(axis=0),
            }
            # Clip the global norm so a too-large learning rate gives a bad
            # trial rather than NaNs.
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
            scale = min(1.0, 5.0 / (norm + 1e-12))
            t += 1
            for k, g in grads.items():
                g = g * scale
                if args.optimizer == "adam":
                    velocity[k] = 0.9 * velocity[k] + 0.1 * g
                    second[k] = 0.999 * second[k] + 0.001 * g * g
                    m_hat = velocity[k] / (1 - 0.9**t)
                    v_hat = second[k] / (1 - 0.999**t)
                    params[k] -= args.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
                else:
                    velocity[k] = args.momentum * velocity[k] - args.lr * g
                    params[k] += velocity[k]
        hidden = np.maximum(0.0, x_val @ params["w1"] + params["b1"])
        logits = hidden @ params["w2"] + params["b2"]
        val_loss, _ = cross_entropy(logits, y_val)
        accuracy = float((logits.argmax(axis=1) == y_val).mean())
        if not math.isfinite(val_loss):
            val_loss = 1e3  # diverged: the worst loss, not a crash
        kubetune.report(step=epoch, val_loss=val_loss, val_accuracy=accuracy)
        print(f"epoch {epoch}: val_loss={val_loss:.4f} val_accuracy={accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
