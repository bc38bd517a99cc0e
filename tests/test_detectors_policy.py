"""AlertPolicy: deterministic ids, severity, cooldown groups, typed events only."""
import json

import pytest
import torch

from streamtta.alerts import AlertPolicy, OffsetRange
from streamtta.alerts.events import (
    DeadLetterEvent,
    GuardResetEvent,
    NovelClusterEvent,
    OODBurstEvent,
    ShiftEvent,
)


def rng(last=63):
    return OffsetRange(topic="digits", partition=2, first=last - 63, last=last)


def shift(b=5, z=5.0, kind="covariate"):
    return ShiftEvent(kind, ("mean_score",), batch_index=b, evidence={"z": {"mean_score": z}, "onset_batch": b - 1})


def test_ids_are_deterministic_across_policies():
    a1 = AlertPolicy().process([shift()], stream_id="s", offsets=rng(), batch_index=5)
    a2 = AlertPolicy().process([shift()], stream_id="s", offsets=rng(), batch_index=5)
    assert len(a1) == 1 and a1[0].id == a2[0].id
    other = AlertPolicy().process([shift()], stream_id="s", offsets=rng(127), batch_index=5)
    assert other[0].id != a1[0].id
    sem = AlertPolicy().process([shift(kind="semantic")], stream_id="s", offsets=rng(), batch_index=5)
    assert sem[0].id != a1[0].id and sem[0].kind.value == "semantic_shift"


def test_one_shift_one_alert_and_cooldown():
    pol = AlertPolicy(cooldown_batches=10)
    evs = [shift(), OODBurstEvent(batch_index=5, rate=0.9, n_batches=3, level=0.5)]
    out = pol.process(evs, stream_id="s", offsets=rng(), batch_index=5)
    assert len(out) == 1  # shift and burst share one cooldown group
    assert out[0].kind.value == "ood_burst" and out[0].severity.value == "critical"  # most severe first
    assert pol.process([shift(8)], stream_id="s", offsets=rng(), batch_index=8) == []
    assert len(pol.process([shift(16)], stream_id="s", offsets=rng(), batch_index=16)) == 1
    assert pol.n_suppressed == 2
    # other kinds have their own cooldown
    nov = NovelClusterEvent(batch_index=17, cluster_id=3, size=40, evidence={"span_batches": 6})
    assert len(pol.process([nov], stream_id="s", offsets=rng(), batch_index=17)) == 1


def test_severity_evidence_action_and_json():
    pol = AlertPolicy(cooldown_batches=0)
    ev = shift(z=9.0)
    ev.evidence["readaptation"] = {"action": "rolled_back", "proxies_before": {"mean_entropy": 0.4}}
    a = pol.process([ev], stream_id="s", offsets=rng(), batch_index=5, signals={"ood_rate": 0.2})[0]
    assert a.severity.value == "critical" and a.action == "rolled_back"
    assert a.evidence["z"]["mean_score"] == 9.0 and a.evidence["batch_signals"]["ood_rate"] == 0.2
    json.loads(a.model_dump_json())
    low = pol.process([shift(b=6, z=4.0)], stream_id="s", offsets=rng(), batch_index=6)[0]
    assert low.severity.value == "warning"


def test_min_severity_and_typed_events_only():
    pol = AlertPolicy(min_severity="warning")
    assert pol.process([DeadLetterEvent(batch_index=1, count=2)], stream_id="s", offsets=rng(), batch_index=1) == []
    out = pol.process([GuardResetEvent(batch_index=2, reason="entropy_spike")], stream_id="s", offsets=rng(),
                      batch_index=2)
    assert len(out) == 1 and out[0].kind.value == "collapse_guard" and out[0].action == "adapter_reset"
    assert "entropy_spike" in out[0].message
    warn = pol.process([DeadLetterEvent(batch_index=3, count=12, reason="bad json")], stream_id="s",
                       offsets=rng(), batch_index=3)
    assert len(warn) == 1 and warn[0].severity.value == "warning" and warn[0].action == "dead_lettered"
    for untyped in (("collapse_guard", {"reason": "entropy_spike"}), ("dead_letter", {"count": 3}), object()):
        with pytest.raises(TypeError, match="cannot handle"):
            pol.process([untyped], stream_id="s", offsets=rng(), batch_index=4)
    with pytest.raises(ValueError, match="min_severity"):
        AlertPolicy(min_severity="loud")


def test_policy_state_round_trip():
    pol = AlertPolicy(cooldown_batches=10)
    pol.process([shift()], stream_id="s", offsets=rng(), batch_index=5)
    other = AlertPolicy(cooldown_batches=10)
    other.load_state_dict(pol.state_dict())
    assert other.process([shift(9)], stream_id="s", offsets=rng(), batch_index=9) == []


def test_policy_state_is_plain_data(tmp_path):
    pol = AlertPolicy(cooldown_batches=10)
    pol.process([shift()], stream_id="s", offsets=rng(), batch_index=5)
    torch.save(pol.state_dict(), tmp_path / "policy.pt")
    other = AlertPolicy(cooldown_batches=10)
    other.load_state_dict(torch.load(tmp_path / "policy.pt", weights_only=True))
    assert other.state_dict() == pol.state_dict()
