"""``streamtta calibrate``: fit a model's pipeline on the user's clean data and write its calibration file."""
from __future__ import annotations

import argparse

from streamtta.cli.common import resolve_config
from streamtta.config import ConfigError


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Read ``--data``, fit the pipeline on it (scorer memories and thresholds, adapter source references:
    this checks that the model, data and configuration work together), and write the calibration file
    (default: next to the model, where later runs of that model find it)."""
    import numpy as np
    import torch

    from streamtta import runner
    from streamtta.calibration import default_calibration_path, load_any, save_calibration
    from streamtta.pipeline import Pipeline

    cfg = resolve_config(args)
    if cfg.model.source is None:
        raise ConfigError("calibrate needs --model (a built-in name, checkpoint, TorchScript file or module:factory)")
    model, meta = runner.load_source_model(cfg)
    data = load_any(args.data, model, args.labels)
    pipe = Pipeline.from_config(cfg, model, meta).calibrate(data)
    print(f"calibrated {cfg.model.source!r} on {data.describe()}; {len(pipe.classes)} classes")
    if data.y is not None:
        with torch.no_grad():
            outs = [model(torch.from_numpy(data.x[i:i + 256])) for i in range(0, len(data.x), 256)]
        pred = np.concatenate([(o[0] if isinstance(o, (tuple, list)) else o).argmax(1).numpy() for o in outs])
        index = {c: i for i, c in enumerate(pipe.classes)}
        acc = float(np.mean(pred == np.array([index[int(v)] for v in data.y])))
        print(f"source model accuracy on these data: {100 * acc:.2f}%")
    if data.feature_names:
        print(f"feature order (JSON rows with object features): {', '.join(data.feature_names)}")
    default = default_calibration_path(cfg.model.source, cfg.model.state_dict)
    out = save_calibration(args.out or default, data, model, model_spec=cfg.model.source)
    if out.resolve() == default.resolve():
        weights = f" --state-dict {cfg.model.state_dict}" if cfg.model.state_dict else ""
        print(f"wrote {out}: later runs of this model load it (streamtta run --model {cfg.model.source}{weights} ...)")
    else:
        print(f"wrote {out}: use it with streamtta run --calibrate-from {out}")
    return 0
