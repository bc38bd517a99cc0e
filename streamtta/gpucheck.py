"""``make gpu-check`` / ``python -m streamtta.gpucheck``: samples/s of a CIFAR-sized model on a GPU.

A WRN-28-2 (:mod:`streamtta.models.wide_resnet`, ~1.47M parameters, random weights) for 3x32x32 inputs
goes through the pipeline on ``--device`` (default ``cuda``) for each adapter spec (default: the
``default`` spec and ``bn``) and batch size (default 64 and 256), on random inputs in [0, 1). The
pipeline is first fitted on random source data (``--calibration`` samples with random labels) so that
scoring runs as in production: the default scorer's FAISS memories (on the GPU with faiss-gpu), the gate
scorer, the monitor. Rows are those of :func:`streamtta.throughput.in_memory_rows`: ``forward`` (the bare
model), ``step`` (the bare adapter step) and ``pipeline`` (:meth:`~streamtta.pipeline.Pipeline.process`
in memory), each timed until the GPU has finished the batch.

One JSON document goes to stdout (progress to stderr): the device (name, memory, torch's CUDA version,
whether FAISS has GPUs), torch / faiss versions, the model's size and the rows. Without a usable CUDA
device it says so and exits 0 -- ``--allow-cpu`` runs the same measurement on the CPU instead (the tests do,
with tiny sizes). The figures are whatever the machine gives: nothing here asserts a speed.

>>> args = parse_args(["--allow-cpu", "--batch-sizes", "4", "--samples", "8"])
>>> args.device, args.batch_sizes, args.adapters
('cuda', [4], ['default', 'bn'])
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m streamtta.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="engine.device to measure on (default: cuda)")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, measure on the CPU instead of stopping")
    p.add_argument("--batch-sizes", type=_ints, default=[64, 256], help="comma-separated (default: 64,256)")
    p.add_argument("--samples", type=int, default=4096, help="samples per batch size (at least two batches)")
    p.add_argument("--calibration", type=int, default=2048, help="random source samples the pipeline is fitted on")
    p.add_argument("--adapters", type=lambda s: [v for v in s.split(",") if v], default=["default", "bn"],
                   help="comma-separated adapter specs (default: default,bn)")
    p.add_argument("--depth", type=int, default=28, help="WRN depth (default 28)")
    p.add_argument("--widen", type=int, default=2, help="WRN widening factor (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the JSON document to this file")
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _versions() -> dict[str, Any]:
    import faiss

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "faiss": getattr(faiss, "__version__", None), "numpy": np.__version__}


def _faiss_on_gpu(pipe: Any) -> bool | None:
    """Whether the main scorer's source memory searches on a GPU (None: the scorer has no such index)."""
    index = getattr(pipe.parts.scorer, "source", None)
    return None if index is None or not hasattr(index, "gpu") else index.gpu is not None


def measure(device: str, *, adapters: Sequence[str], batch_sizes: Sequence[int], samples: int, calibration: int,
            depth: int = 28, widen: int = 2, seed: int = 0) -> dict[str, Any]:
    """The JSON document of the module docstring, measured on ``device`` (an ``engine.device`` value)."""
    from streamtta.config import load_config
    from streamtta.devices import describe_device
    from streamtta.models.wide_resnet import wide_resnet
    from streamtta.pipeline import Pipeline
    from streamtta.throughput import in_memory_rows

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = wide_resnet(depth, widen, num_classes=10).eval()
    n_params = sum(p.numel() for p in model.parameters())
    x_src = rng.random((calibration, 3, 32, 32), dtype=np.float32)
    y_src = rng.integers(0, 10, calibration)
    doc: dict[str, Any] = {"device": describe_device(device), "versions": _versions(),
                           "model": {"name": f"wrn-{depth}-{widen}", "params": n_params, "input": [3, 32, 32]},
                           "calibration_samples": calibration, "rows": []}
    if torch.device(doc["device"]["resolved"]).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    doc["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    for spec in adapters:
        cfg = load_config(overrides={"engine": {"device": device, "seed": seed}}, env=False)
        t0 = time.perf_counter()
        pipe = Pipeline(model, adapter=spec, config=cfg, num_classes=10).fit_source(x_src, y_src)
        fit_s = time.perf_counter() - t0
        _say(f"{spec} ({pipe.blueprint.spec}): fitted on {calibration} samples in {fit_s:.1f} s")
        for bs in batch_sizes:
            n = bs * max(2, math.ceil(samples / bs))  # whole batches, one of them the warm-up
            x = torch.from_numpy(rng.random((n, 3, 32, 32), dtype=np.float32))
            for r in in_memory_rows(pipe, x, bs):
                r.update(adapter=spec, spec=pipe.blueprint.spec, samples=n)
                doc["rows"].append(r)
                _say(f"  batch {bs} {r['path']}: {r['samples_per_s']} samples/s (p50 {r['p50_ms']:.1f} ms)")
        doc.setdefault("fit_s", {})[spec] = round(fit_s, 2)
        doc.setdefault("faiss_on_gpu", {})[spec] = _faiss_on_gpu(pipe)
    if torch.device(doc["device"]["resolved"]).type == "cuda":
        doc["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    from streamtta.config import ConfigError
    from streamtta.devices import resolve_device

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    try:
        resolve_device(device)
    except ConfigError as e:
        if not args.allow_cpu:
            print(json.dumps({"cuda_available": torch.cuda.is_available(), "skipped": str(e),
                              "hint": "run where a GPU is lent, or pass --allow-cpu"}, indent=2))
            _say(f"gpu-check: {e}; nothing measured (--allow-cpu measures on the CPU)")
            return 0
        _say(f"gpu-check: {e}; measuring on the CPU (--allow-cpu)")
        device = "cpu"
    doc = measure(device, adapters=args.adapters, batch_sizes=args.batch_sizes, samples=args.samples,
                  calibration=args.calibration, depth=args.depth, widen=args.widen, seed=args.seed)
    doc["cuda_available"] = torch.cuda.is_available()
    doc["requested_device"] = args.device
    doc["threads"] = torch.get_num_threads()
    text = json.dumps(doc, indent=2, default=str)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
