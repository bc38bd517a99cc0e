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
import contextlib
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from streamtta.models.augment import random_affine
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
from streamtta.models.fit import fit_classifier
from streamtta.models.recipes import RECIPES, Recipe

__all__ = ["train_source", "source_holdout", "load_source_train", "load_source_test", "RECIPES", "Recipe",
           "random_affine", "accuracy", "main"]

log = logging.getLogger("streamtta.models")


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
    recipe: str | None = None,
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
        takes the recipe's values.
    seed
        Seeds initialisation, shuffling, augmentation and dropout.
    out
        If given, the checkpoint is saved there (plus its ``.json`` sidecar).
    holdout_fraction, test_fraction, split_seed
        Data splits (see :mod:`streamtta.models.data`); independent of ``seed`` so models with
        different seeds share the same test data and holdout.
    progress
        Show a rich progress bar.
    recipe
        A key of :data:`RECIPES` (e.g. ``"digits-cnn-ln"``, a held-out backbone); default: the dataset's.
    num_threads
        torch intra-op threads while training (restored afterwards). The default 1 makes the
        result independent of the machine's core count; ``None`` keeps the current setting.

    Returns
    -------
    ``(model, meta)`` with the model in eval mode.
    """
    key = canonical_dataset(dataset)
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    recipe_name = recipe
    recipe = RECIPES[recipe or key]
    if (recipe.dataset or key) != key:
        raise ValueError(f"recipe {recipe_name!r} trains on {recipe.dataset!r}, not {key!r}")
    epochs = recipe.epochs if epochs is None else int(epochs)
    lr = recipe.lr if lr is None else float(lr)
    batch_size = recipe.batch_size if batch_size is None else int(batch_size)
    weight_decay = recipe.weight_decay if weight_decay is None else float(weight_decay)
    if epochs < 0 or lr <= 0 or batch_size < 2:
        raise ValueError(f"need epochs >= 0, lr > 0 and batch_size >= 2; got {epochs}, {lr}, {batch_size}")

    split = load_dataset_split(key, test_fraction, split_seed)
    known = _known_classes(key, split.num_classes, recipe, known_classes)
    fit_idx, hold_idx = holdout_indices(split.y_train, known, holdout_fraction, split_seed)
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
        "recipe": recipe_name,
    }
    meta = _untrained_meta(
        split, key, recipe, known, fit_idx, hold_idx, model_name=model_name, seed=seed, epochs=epochs,
        created_by=created_by
        or _command(key, seed, epochs, None if known_classes is None else known, out_path, extra_args),
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
    with _deterministic_torch(seed, num_threads):
        model = build_from_meta(meta)
        steps = fit_classifier(model, x_fit, y_fit, recipe.augment, epochs, lr, batch_size, weight_decay, seed,
                               progress, model_name)
    train_seconds = time.perf_counter() - t0
    model.eval()

    meta = _evaluated_meta(meta, model, has_holdout=len(hold_idx) > 0, train_seconds=train_seconds,
                           train_steps=steps)
    log.info("trained %s: clean accuracy %.4f in %.1f s", model_name, meta.clean_accuracy, train_seconds)
    if out_path is not None:
        save_checkpoint(out_path, model, meta)
    return model, meta


def _known_classes(key: str, n_cls: int, recipe: Recipe, known_classes: Sequence[int] | None) -> list[int]:
    """The dataset class ids the model learns, in output order (default: the recipe's)."""
    if known_classes is None:
        unknown_default = {n_cls + k for k in recipe.unknown_from_end}
        return [c for c in range(n_cls) if c not in unknown_default]
    known = [int(c) for c in known_classes]
    bad = [c for c in known if not 0 <= c < n_cls]
    if bad or len(set(known)) != len(known) or len(known) < 2:
        raise ValueError(
            f"known_classes must be >= 2 distinct ids in 0..{n_cls - 1} for {key!r}, got {list(known_classes)}"
        )
    return known


def _input_normalisation(x_fit: np.ndarray, kind: str) -> Normalisation:
    """Per-channel (images) or per-feature (tabular; constant features get std 1) mean and std of
    the training inputs."""
    if kind == "image":
        mean = [float(x_fit[:, c].mean()) for c in range(x_fit.shape[1])]
        std = [float(x_fit[:, c].std()) for c in range(x_fit.shape[1])]
    else:
        mean = x_fit.mean(0).astype(np.float64).tolist()
        std = [s if s > 1e-6 else 1.0 for s in x_fit.std(0).astype(np.float64).tolist()]
    return Normalisation(mean=mean, std=std)


def _untrained_meta(split: Any, key: str, recipe: Recipe, known: list[int], fit_idx: np.ndarray,
                    hold_idx: np.ndarray, *, model_name: str, seed: int, epochs: int, created_by: str,
                    data_split: DataSplit, hyperparameters: dict[str, Any]) -> ModelMeta:
    """The model's metadata before training (feature dimension and accuracies still 0)."""
    n_cls = split.num_classes
    unknown = [c for c in range(n_cls) if c not in known]
    arch_kwargs = dict(recipe.arch_kwargs, num_classes=len(known))
    if recipe.arch == "mlp":
        arch_kwargs["in_features"] = int(split.x_train.shape[1])
    return ModelMeta(
        name=model_name,
        arch=recipe.arch,
        arch_kwargs=arch_kwargs,
        dataset=key,
        classes=known,
        class_names=[split.class_names[c] for c in known],
        unknown_classes=unknown,
        unknown_class_names=[split.class_names[c] for c in unknown],
        input_shape=list(split.x_train.shape[1:]),
        normalisation=_input_normalisation(split.x_train[fit_idx], split.kind),
        feature_dim=0,
        seed=seed,
        clean_accuracy=0.0,
        epochs=epochs,
        created_by=created_by,
        data_split=data_split,
        hyperparameters=hyperparameters,
    )


@contextlib.contextmanager
def _deterministic_torch(seed: int, num_threads: int | None) -> Iterator[None]:
    """Seeded, deterministic torch with ``num_threads`` intra-op threads (None: unchanged); the global
    RNG, determinism flags and thread count are restored afterwards."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def _evaluated_meta(meta: ModelMeta, model: nn.Module, *, has_holdout: bool, train_seconds: float,
                    train_steps: int) -> ModelMeta:
    """``meta`` completed after training: feature dimension, clean test and holdout accuracy, cost."""
    x_te, y_te = load_source_test(meta, as_index=True)
    x_ho, y_ho = source_holdout(meta, as_index=True) if has_holdout else (x_te[:0], y_te[:0])
    meta = meta.model_copy(
        update={
            "feature_dim": int(model.fc.in_features),
            "clean_accuracy": round(accuracy(model, x_te, y_te), 6),
            "holdout_accuracy": round(accuracy(model, x_ho, y_ho), 6) if len(y_ho) else None,
            "train_seconds": round(train_seconds, 2),
            "train_steps": int(train_steps),
        }
    )
    return ModelMeta.model_validate(meta.model_dump())


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``streamtta train-source`` (shared with ``python -m streamtta.models.train``)."""
    parser.add_argument("--dataset", default="digits", help="digits | segment")
    parser.add_argument("--recipe", default=None, help="a named recipe instead of the dataset's default, e.g. "
                        "digits-cnn-ln (see streamtta.models.recipes)")
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
        name=args.name, progress=not args.no_progress, recipe=args.recipe,
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
