"""Train the source models on clean data of the known classes.

``train_source("digits")`` trains a ResNet-8 on digits 0-7 (8 and 9 stay unknown, for open-set
streams) with light random-affine augmentation; ``train_source("segment")`` trains an MLP on the
first six ImageSegments classes (the last, ``window``, stays unknown). A stratified holdout slice
of the known-class train split is kept out of training for OOD-threshold calibration
(:func:`source_holdout`). Training is deterministic given ``seed`` and runs in seconds on one CPU
core.

Command line (same options as ``streamtta train-source``)::

    python -m streamtta.models.train --dataset digits --seed 0 --out streamtta/models/checkpoints/digits-resnet.pt

>>> model, meta = train_source("segment", epochs=2, progress=False)  # doctest: +SKIP
>>> meta.classes, meta.unknown_classes  # doctest: +SKIP
([0, 1, 2, 3, 4, 5], [6])
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamtta.models.checkpoint import DataSplit, ModelMeta, Normalisation, build_from_meta, save_checkpoint
from streamtta.models.data import (
    canonical_dataset,
    holdout_indices,
    indices_digest,
    load_dataset_split,
    load_source_test,
    load_source_train,
    source_holdout,
)

__all__ = ["train_source", "source_holdout", "load_source_train", "load_source_test", "RECIPES", "main"]

log = logging.getLogger("streamtta.models")


@dataclass(frozen=True)
class Recipe:
    """Default architecture and optimisation settings of one built-in dataset."""

    name: str  # builtin model name
    arch: str
    arch_kwargs: dict[str, Any]
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    augment: bool
    #: Default unknown classes, as negative offsets from the end (-1 = last class).
    unknown_from_end: tuple[int, ...] = field(default=(-1,))


RECIPES: dict[str, Recipe] = {
    "digits": Recipe(
        name="digits-resnet",
        arch="resnet",
        arch_kwargs={"in_channels": 1, "widths": [16, 32, 64], "blocks_per_stage": 1},
        epochs=12,
        lr=0.05,
        batch_size=64,
        weight_decay=5e-4,
        augment=True,
        unknown_from_end=(-2, -1),
    ),
    "segment": Recipe(
        name="segment-mlp",
        arch="mlp",
        arch_kwargs={"hidden": [64, 32], "dropout": 0.0},
        epochs=60,
        lr=0.05,
        batch_size=64,
        weight_decay=5e-4,
        augment=False,
        unknown_from_end=(-1,),
    ),
}


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 10.0,
    max_shift: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Random rotation / scale / shift per image (zero padding); ``max_shift`` is a fraction of
    the image size."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    ang = u[:, 0] * math.radians(max_degrees)
    s = (scale[0] + scale[1]) / 2 + u[:, 1] * (scale[1] - scale[0]) / 2
    tx, ty = u[:, 2] * 2 * max_shift, u[:, 3] * 2 * max_shift
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` in eval mode (restores the previous mode)."""
    if len(y) == 0:
        return float("nan")
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was)
    return correct / len(y)


def _command(dataset: str, seed: int, epochs: int, known: list[int] | None, out: Path | None, extra: dict[str, Any]) -> str:
    parts = ["streamtta", "train-source", "--dataset", dataset, "--seed", str(seed), "--epochs", str(epochs)]
    if known is not None:
        parts += ["--known-classes", ",".join(map(str, known))]
    for k, v in extra.items():
        if v is not None:
            parts += [f"--{k}", str(v)]
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def train_source(
    dataset: str = "digits",
    *,
    known_classes: Sequence[int] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    holdout_fraction: float = 0.15,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    name: str | None = None,
    progress: bool = True,
    created_by: str | None = None,
    num_threads: int | None = 1,
) -> tuple[nn.Module, ModelMeta]:
    """Train a source model on the clean known-class train split of ``dataset``.

    Parameters
    ----------
    dataset
        ``"digits"`` or ``"segment"``.
    known_classes
        Dataset class ids the model learns, in output order. Default: all but the last two
        digits (8, 9) / the last Segment class.
    epochs, lr, batch_size, weight_decay
        Optimisation (SGD + Nesterov momentum 0.9, linear warm-up then cosine decay); ``None``
        takes the dataset recipe in :data:`RECIPES`.
    seed
        Seeds initialisation, shuffling, augmentation and dropout.
    out
        If given, the checkpoint is saved there (plus its ``.json`` sidecar).
    holdout_fraction, test_fraction, split_seed
        Data splits (see :mod:`streamtta.models.data`); independent of ``seed`` so models with
        different seeds share the same test data and holdout.
    progress
        Show a rich progress bar.
    num_threads
        torch intra-op threads while training (restored afterwards). The default 1 makes the
        result independent of the machine's core count; ``None`` keeps the current setting.

    Returns
    -------
    ``(model, meta)`` with the model in eval mode.
    """
    key = canonical_dataset(dataset)
    recipe = RECIPES[key]
    epochs = recipe.epochs if epochs is None else int(epochs)
    lr = recipe.lr if lr is None else float(lr)
    batch_size = recipe.batch_size if batch_size is None else int(batch_size)
    weight_decay = recipe.weight_decay if weight_decay is None else float(weight_decay)
    if epochs < 0 or lr <= 0 or batch_size < 2:
        raise ValueError(f"need epochs >= 0, lr > 0 and batch_size >= 2; got {epochs}, {lr}, {batch_size}")

    split = load_dataset_split(key, test_fraction, split_seed)
    n_cls = split.num_classes
    default_known = known_classes is None
    if known_classes is None:
        unknown_default = {n_cls + k for k in recipe.unknown_from_end}
        known = [c for c in range(n_cls) if c not in unknown_default]
    else:
        known = [int(c) for c in known_classes]
        bad = [c for c in known if not 0 <= c < n_cls]
        if bad or len(set(known)) != len(known) or len(known) < 2:
            raise ValueError(
                f"known_classes must be >= 2 distinct ids in 0..{n_cls - 1} for {key!r}, got {list(known_classes)}"
            )
    unknown = [c for c in range(n_cls) if c not in known]

    fit_idx, hold_idx = holdout_indices(split.y_train, known, holdout_fraction, split_seed)
    x_fit_np = split.x_train[fit_idx]
    if split.kind == "image":
        mean = [float(x_fit_np[:, c].mean()) for c in range(x_fit_np.shape[1])]
        std = [float(x_fit_np[:, c].std()) for c in range(x_fit_np.shape[1])]
    else:
        mean = x_fit_np.mean(0).astype(np.float64).tolist()
        std = [s if s > 1e-6 else 1.0 for s in x_fit_np.std(0).astype(np.float64).tolist()]
    arch_kwargs = dict(recipe.arch_kwargs, num_classes=len(known))
    if recipe.arch == "mlp":
        arch_kwargs["in_features"] = int(split.x_train.shape[1])

    out_path = Path(out) if out is not None else None
    model_name = name or recipe.name
    hyper = {"lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "momentum": 0.9,
             "nesterov": True, "schedule": "warmup+cosine", "augment": recipe.augment}
    extra_args = {
        "lr": None if lr == recipe.lr else lr,
        "batch-size": None if batch_size == recipe.batch_size else batch_size,
        "weight-decay": None if weight_decay == recipe.weight_decay else weight_decay,
        "holdout-fraction": None if holdout_fraction == 0.15 else holdout_fraction,
        "name": None if model_name == recipe.name else model_name,
    }
    meta = ModelMeta(
        name=model_name,
        arch=recipe.arch,
        arch_kwargs=arch_kwargs,
        dataset=key,
        classes=known,
        class_names=[split.class_names[c] for c in known],
        unknown_classes=unknown,
        unknown_class_names=[split.class_names[c] for c in unknown],
        input_shape=list(split.x_train.shape[1:]),
        normalisation=Normalisation(mean=mean, std=std),
        feature_dim=0,
        seed=seed,
        clean_accuracy=0.0,
        epochs=epochs,
        created_by=created_by
        or _command(key, seed, epochs, None if default_known else known, out_path, extra_args),
        data_split=DataSplit(
            test_fraction=test_fraction,
            seed=split_seed,
            holdout_fraction=holdout_fraction,
            holdout_digest=indices_digest(hold_idx) if len(hold_idx) else None,
        ),
        hyperparameters=hyper,
    )

    x_fit, y_fit = load_source_train(meta, as_index=True)
    t0 = time.perf_counter()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_from_meta(meta)
            _fit(model, x_fit, y_fit, recipe.augment, epochs, lr, batch_size, weight_decay, seed, progress, model_name)
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
    train_seconds = time.perf_counter() - t0
    model.eval()

    x_te, y_te = load_source_test(meta, as_index=True)
    x_ho, y_ho = source_holdout(meta, as_index=True) if len(hold_idx) else (x_te[:0], y_te[:0])
    meta = meta.model_copy(
        update={
            "feature_dim": int(model.fc.in_features),
            "clean_accuracy": round(accuracy(model, x_te, y_te), 6),
            "holdout_accuracy": round(accuracy(model, x_ho, y_ho), 6) if len(y_ho) else None,
            "train_seconds": round(train_seconds, 2),
        }
    )
    meta = ModelMeta.model_validate(meta.model_dump())
    log.info("trained %s: clean accuracy %.4f in %.1f s", model_name, meta.clean_accuracy, train_seconds)
    if out_path is not None:
        save_checkpoint(out_path, model, meta)
    return model, meta


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    augment: bool,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    progress: bool,
    label: str,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=0.9, nesterov=True,
    )
    n = len(y)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    bar = None
    if progress and total:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=False)
        bar.start()
        task = bar.add_task(f"train {label}", total=total, status="")
    model.train()
    step = 0
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for b in range(steps_per_epoch):
                idx = perm[b * batch_size : (b + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                if augment:
                    xb = random_affine(xb, gen)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
                if bar is not None:
                    bar.update(task, advance=1, status=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    finally:
        if bar is not None:
            bar.stop()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``streamtta train-source`` (shared with ``python -m streamtta.models.train``)."""
    parser.add_argument("--dataset", default="digits", help="digits | segment")
    parser.add_argument("--known-classes", default=None, help="comma-separated class ids, in output order")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--holdout-fraction", type=float, default=0.15)
    parser.add_argument("--name", default=None, help="model name stored in the checkpoint")
    parser.add_argument("--out", default=None, help="checkpoint path (.pt); a .json sidecar is written next to it")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_from_args(args: argparse.Namespace) -> tuple[nn.Module, ModelMeta]:
    known = None
    if args.known_classes:
        try:
            known = [int(c) for c in str(args.known_classes).split(",") if c.strip()]
        except ValueError as e:
            raise SystemExit(f"--known-classes must be comma-separated ints, got {args.known_classes!r}") from e
    return train_source(
        args.dataset, known_classes=known, epochs=args.epochs, seed=args.seed, out=args.out, lr=args.lr,
        batch_size=args.batch_size, weight_decay=args.weight_decay, holdout_fraction=args.holdout_fraction,
        name=args.name, progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="streamtta train-source", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    _, meta = run_from_args(args)
    print(f"{meta.name}: clean accuracy {meta.clean_accuracy:.4f} on known classes {meta.classes} "
          f"(holdout {meta.holdout_accuracy}), {meta.train_seconds} s" + (f" -> {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
