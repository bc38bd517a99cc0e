"""Change-point location inside a batch and the re-adapter's two-part re-processing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from streamtta.adapters import build_adapter
from streamtta.readapt import ReAdapter
from streamtta.detectors.shift.onset import OnsetLocator, sample_descriptors


def test_locates_a_change_in_feature_vectors_and_images():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(64, 5))
    v[23:, 2:4] += 4.0  # two features move from sample 23 on
    onset = OnsetLocator().locate(v)
    assert onset is not None and abs(onset.index - 23) <= 1 and onset.p_value <= 0.01
    img = rng.normal(0.5, 0.05, size=(48, 1, 6, 6))
    img[:30] = img[:30] * 0.2  # low contrast before sample 30
    assert OnsetLocator().locate(img).index == 30


def test_no_change_short_batch_and_constant_batch_give_none():
    rng = np.random.default_rng(2)
    loc = OnsetLocator(min_segment=8)
    hits = sum(loc.locate(rng.normal(size=(64, 4))) is not None for _ in range(20))
    assert hits <= 2  # alpha = 0.01 per batch
    assert loc.locate(rng.normal(size=(15, 4)) + np.r_[np.zeros(7), np.ones(8) * 9][:, None]) is None
    assert loc.locate(np.ones((64, 3))) is None


def test_min_segment_bounds_the_split_and_arguments_are_checked():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(64, 3))
    v[4:] += 5.0  # change after 4 samples
    assert OnsetLocator(min_segment=16).locate(v).index == 16
    assert OnsetLocator(min_segment=4).locate(v).index == 4
    with pytest.raises(ValueError):
        OnsetLocator(alpha=1.5)
    with pytest.raises(ValueError):
        sample_descriptors(np.ones(5))


def test_reprocess_restarts_from_the_pre_batch_state_and_steps_on_both_parts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    adapter = build_adapter("tent", net, num_classes=3, lr=1e-2)
    x = torch.rand(64, 1, 8, 8)
    x[40:] = x[40:] * 0.1 + 2.0 * torch.rand(24, 1, 8, 8)  # a new domain from sample 40 on
    pre = adapter.state_dict()
    adapter.step(x)  # the straddling batch as one

    def step(part):
        return adapter.step(part), np.zeros(len(part)), np.zeros(len(part), dtype=bool), np.ones(len(part), bool)

    redo = ReAdapter().reprocess(adapter, x, pre, step)
    assert redo is not None and redo.evidence["onset_index"] == 40
    out, scores, flags, keep = redo.outputs
    assert out.logits.shape == (64, 3) and scores.shape == (64,) and keep.all()
    # same as a twin adapter that saw the two parts as two batches from the pre-batch state
    twin = build_adapter("tent", net, num_classes=3, lr=1e-2)
    twin.load_state_dict(pre)
    first = twin.step(x[:40]).logits
    second = twin.step(x[40:]).logits
    assert torch.allclose(out.logits, torch.cat([first, second]), atol=1e-6)
    for (k, a), b in zip(adapter.state_dict()["model"].items(), twin.state_dict()["model"].values()):
        assert torch.allclose(a, b, atol=1e-6), k
    # no change point: nothing done, adapter untouched
    calm = torch.rand(64, 1, 8, 8)
    before = adapter.state_dict()["model"]
    assert ReAdapter().reprocess(adapter, calm, pre, step) is None
    assert all(torch.equal(a, b) for a, b in zip(before.values(), adapter.state_dict()["model"].values()))
    assert ReAdapter(split_onset=False).reprocess(adapter, x, pre, step) is None


def test_wide_vectors_give_the_same_split_as_their_projection():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(32, 500))
    v[20:, :50] += 1.5  # a tenth of the features move from sample 20 on
    onset = OnsetLocator().locate(v)
    assert onset is not None and abs(onset.index - 20) <= 1
    # the SVD basis keeps every squared distance: the statistic equals the one on the raw columns
    z = (v - v.mean(0)) / v.std(0)
    from streamtta.detectors.shift.onset import _max_split
    raw, _ = _max_split(z[None], 8, 24, z.shape[1])
    assert onset.statistic == pytest.approx(float(raw[0]), rel=1e-9)


def test_reprocess_adds_up_the_counts_of_both_parts():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    adapter = build_adapter("bn", net, num_classes=3)
    x = torch.rand(64, 1, 8, 8)
    x[30:] = x[30:] * 0.1 + 2.0 * torch.rand(34, 1, 8, 8)
    pre = adapter.state_dict()
    calls = []

    def step(part):
        out = adapter.step(part)
        out.info["n_kept"], out.info["guard"] = len(part), f"g{len(calls)}"
        calls.append(len(part))
        return out, np.zeros(len(part)), np.zeros(len(part), bool), np.ones(len(part), bool)

    redo = ReAdapter().reprocess(adapter, x, pre, step)
    assert calls == [30, 34]
    info = redo.outputs[0].info
    assert info["n_kept"] == 64 and info["guard"] == "g1" and info["onset_index"] == 30


def test_reprocess_over_held_batches_restarts_from_the_batch_holding_the_change():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    adapter = build_adapter("bn", net, num_classes=3)
    torch.manual_seed(1)
    batches = [torch.rand(32, 1, 8, 8) for _ in range(3)]
    pres = []
    for b in batches:
        pres.append(adapter.state_dict())
        adapter.step(b)
    calls = []

    def step(part):
        calls.append(len(part))
        return adapter.step(part), np.zeros(len(part)), np.zeros(len(part), bool), np.ones(len(part), bool)

    def shifted(at):  # the three batches with a new domain from global sample ``at`` on
        xs = [b.clone() for b in batches]
        full = torch.cat(xs)
        full[at:] = full[at:] * 0.1 + 2.0 * torch.rand(len(full) - at, 1, 8, 8)
        return list(full.split(32))

    # change 20 samples into the middle batch: restart before it, head 20, tail 12 + 32
    redo = ReAdapter().reprocess(adapter, shifted(52), pres, step)
    assert calls == [20, 44] and redo.outputs[0].logits.shape == (64, 3)
    assert (redo.evidence["onset_batch"], redo.evidence["first_batch"], redo.evidence["onset_index"]) == (1, 1, 20)
    assert redo.evidence["batch_size"] == 32 and redo.evidence["n_batches"] == 3
    # 4 samples into the last batch: too short a head, it joins the batch before (restart before that one)
    calls.clear()
    redo = ReAdapter().reprocess(adapter, shifted(68), pres, step)
    assert calls == [36, 28] and (redo.evidence["first_batch"], redo.evidence["onset_index"]) == (1, 4)
    # on a batch boundary nothing is mixed: nothing to do; states must match the batches
    assert ReAdapter().reprocess(adapter, shifted(64), pres, step) is None
    with pytest.raises(ValueError, match="one pre-batch state per batch"):
        ReAdapter().reprocess(adapter, batches, pres[:2], step)
