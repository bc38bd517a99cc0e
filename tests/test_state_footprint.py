"""Per-stream state footprint: what every stream's pipeline shares with the blueprint it was spawned from,
and what stays its own.

The fixed source parts (the contrast scorer's source memory, the Mahalanobis precision of the gate, the
model's frozen weights and the norm layers' source statistics) are shared, read-only, by every spawned
pipeline and left out of its state; the state each stream learns stays independent. Older states that
still hold the fixed parts load too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import streamtta
from streamtta.checkpoints import CheckpointStore


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.BatchNorm1d(8),
                        nn.ReLU(), nn.Linear(8, 3))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (rng.normal(size=(300, 6)) + 2.0 * np.eye(3, 6)[y]).astype(np.float32)
    net.train()
    with torch.no_grad():
        for i in range(0, 300, 50):
            net(torch.from_numpy(x[i:i + 50]))
    pipe = streamtta.Pipeline(net.eval(), config={"monitor": {"readapt": False}})
    pipe.fit_source(x, y)
    yield pipe
    torch.set_num_threads(threads)


def _batches(seed: int, n: int = 5, shift: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 6, generator=g) + shift for _ in range(n)]


def _flat(st) -> dict[str, object]:
    """Nested state -> {path: value} (tensors and arrays as numpy) for equality checks."""
    out: dict[str, object] = {}

    def walk(o, path):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}.{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = o.detach().numpy() if isinstance(o, torch.Tensor) else o
    walk(st, "")
    return out


def _same_state(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) if isinstance(fa[k], np.ndarray)
                                          else fa[k] == fb[k] for k in fa)


def _outputs(pipe, xs):
    return [(r.predictions.tolist(), r.ood_scores.tolist(), r.ood_flags.tolist())
            for r in (pipe.process(x) for x in xs)]


def test_spawned_pipelines_share_the_fixed_parts_and_leave_them_out_of_their_state(template):
    a, b = template.spawn(), template.spawn()
    sa, sb = a.parts.scorer, b.parts.scorer
    assert sa.source is sb.source and sa.source_vecs is sb.source_vecs is template.parts.scorer.source_vecs
    assert sa.known is not sb.known
    ga, gb = a.parts.gate_scorer.components[0], b.parts.gate_scorer.components[0]
    assert ga.precision is gb.precision and ga.means is not gb.means
    ma, mb = a.adapter.model, b.adapter.model
    assert ma[0].weight is mb[0].weight and ma[6].bias is mb[6].bias and ma[1].source_mean is mb[1].source_mean
    assert ma[1].weight is not mb[1].weight and ma[1].slot_means is not mb[1].slot_means
    st = a.state_dict()
    assert "source" not in st["scorer"] and "precision" not in st["gate_scorer"]["components"][0]
    assert not {"0.weight", "3.weight", "6.weight", "1.source_mean"} & set(st["adapter"]["model"])
    assert {"1.weight", "1.slot_means", "4.slot_vars"} <= set(st["adapter"]["model"])


def test_two_streams_fed_different_data_end_apart_and_the_template_is_unchanged(template):
    before = template.state_dict()
    a, b = template.spawn(), template.spawn()
    out_a = _outputs(a, _batches(1))
    _outputs(b, _batches(2, shift=1.5))
    assert not _same_state(a.state_dict(), b.state_dict())
    assert _same_state(template.state_dict(), before)
    # a third stream fed a's data gives a's outputs: nothing of b leaked into what they share
    assert _outputs(template.spawn(), _batches(1)) == out_a


def test_a_checkpointed_stream_continues_identically_and_older_full_states_load(template, tmp_path):
    a = template.spawn()
    _outputs(a, _batches(3))
    store = CheckpointStore(tmp_path)
    store.save("a", {"pipeline": a.state_dict()})
    restored = template.spawn()
    restored.load_state_dict(store.load("a")["pipeline"])
    # an older checkpoint: the same state with the fixed parts in it (as they were saved before sharing)
    old = a.state_dict()
    old["scorer"]["source"] = torch.from_numpy(template.parts.scorer.source_vecs.copy())
    old["adapter"]["model"] = {k: v.clone() for k, v in a.adapter.model.state_dict().items()}
    old_restored = template.spawn()
    old_restored.load_state_dict(old)
    assert old_restored.parts.scorer.source is template.parts.scorer.source  # equal: still shared
    nxt = _batches(4, n=3)
    expected = _outputs(a, nxt)
    assert _outputs(restored, nxt) == expected
    assert _outputs(old_restored, nxt) == expected


def test_an_older_state_with_other_fixed_values_gets_its_own_copy(template):
    a, b = template.spawn(), template.spawn()
    st = a.state_dict()
    st["scorer"]["source"] = torch.from_numpy(template.parts.scorer.source_vecs[::-1].copy() * 0.5)
    st["adapter"]["model"] = {**st["adapter"]["model"], "0.weight": a.adapter.model[0].weight.detach() * 2.0}
    a.load_state_dict(st)
    assert a.parts.scorer.source is not b.parts.scorer.source
    assert "source" in a.state_dict()["scorer"] and "source" not in b.state_dict()["scorer"]
    assert torch.equal(a.adapter.model[0].weight, b.adapter.model[0].weight * 2.0)
    assert b.adapter.model[0].weight is template.adapter.model[0].weight
    assert "0.weight" in a.state_dict()["adapter"]["model"]


def test_a_spawned_adapter_equals_a_freshly_built_one(template):
    bp = template.blueprint
    from streamtta.adapters import build_adapter

    torch.manual_seed(bp.cfg.engine.seed)
    fresh = build_adapter(bp.spec, bp.model, bp.num_classes, **bp.cfg.adapter.options)
    prior, reference = bp._source_fit
    fresh.set_class_prior(prior)
    fresh.set_guard_reference(reference)
    spawned = bp.new_adapter()
    for x in _batches(5, shift=0.7):
        o1, o2 = fresh.step(x), spawned.step(x)
        assert torch.equal(o1.logits, o2.logits) and torch.equal(o1.features, o2.features)
    full = spawned.model.state_dict()  # shared and own tensors alike
    assert set(spawned.shared_keys) and _same_state(fresh.state_dict()["model"], dict(full))
