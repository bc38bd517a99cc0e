"""Online, :class:`ReAdapter` answers a confirmed shift in two ways:

* **onset split** (``split_onset``, on by default): when the change point lies inside the batch that
  confirmed the shift, or inside one before it whose predictions the engine still holds
  (``monitor.hold_batches``; :class:`~streamtta.detectors.shift.onset.OnsetLocator` on the arrival order), the
  engine's adapter goes back to its state before the batch holding it and steps again in two parts,
  before and after the change point, and those outputs are reported (:meth:`ReAdapter.reprocess`).
  Statistics of a batch that straddles two domains fit neither part; it is the batch a shift costs
  most on, and no monitor can confirm a shift before it has been seen;
* **meta restart** (``restart``, opt-in, as published): it keeps a bounded buffer of recent
  ID-accepted inputs, snapshots the adapter's parameters, restarts them from ``theta*``, takes a few
  entropy (+ diversity) steps on the post-shift part of the buffer, re-fits the scorer
  (prototypes/means and threshold) and resets the shift monitor's references; it rolls back to the
  snapshot when the unsupervised proxies got worse (mean entropy up, or prediction-histogram entropy
  down = collapse).

Measured on ``digits-c-continual-openset`` with the default gradient-free adapter (README, "Open set"):
the onset split raises accuracy, AUROC and the speed of recovery; the meta restart costs accuracy
and AUROC there (the statistics adapter has re-estimated its statistics before the restart acts), so
it is off by default. It targets gradient adapters (``tent``, ``eata``), whose parameters carry the
previous domain; check it on a replay of your stream first (``streamtta bench --variant
'restart:monitor.readapt_options={restart=true}'``).
"""
from __future__ import annotations

import math
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from streamtta.readapt.params import _logits, entropy
from streamtta.types import StepOutput


# ----------------------------------------------------------------------------------------------
# online re-adaptation
# ----------------------------------------------------------------------------------------------
def prediction_proxies(logits: torch.Tensor) -> dict[str, float]:
    """Unsupervised accuracy proxies: mean entropy, prediction-histogram entropy (normalised to
    [0, 1]) and mean confidence."""
    p = logits.softmax(1)
    c = logits.shape[1]
    hist = torch.bincount(p.argmax(1), minlength=c).float()
    hist = hist / hist.sum()
    h_hist = float(-(hist[hist > 0] * hist[hist > 0].log()).sum() / math.log(c)) if c > 1 else 0.0
    return {"mean_entropy": float(entropy(logits).mean()), "hist_entropy": h_hist,
            "mean_confidence": float(p.max(1).values.mean())}


@dataclass(frozen=True)
class Reprocessed:
    """Outputs of a batch processed again in two parts: ``(StepOutput, scores, flags, keep)`` and evidence."""

    outputs: tuple[Any, np.ndarray, np.ndarray, Any]
    evidence: dict[str, Any]


class ReAdapter:
    """What the engine does on a confirmed shift: re-process the batch that holds the change point
    (:meth:`reprocess`) and, with ``restart``, restart the adapter from the meta-initialisation
    (:meth:`on_shift`).

    Parameters
    ----------
    meta_init
        ``{parameter name: tensor}`` from :func:`meta_train` / :func:`load_meta_init`; needed only with
        ``restart`` (it is configuration, loaded from file: not part of :meth:`state_dict`).
    steps, lr
        Adam steps on the buffer and their learning rate (``restart`` only).
    buffer_size
        Maximum number of recent ID-accepted inputs kept (``restart`` only).
    batch_size
        Minibatch size of the re-adaptation steps.
    recent_batches
        Without an onset estimate, use the samples of the last this-many observed batches.
    min_samples
        Fewer post-shift samples than this: use the most recent ``min_samples`` of the buffer.
    diversity_weight
        Weight of the prediction-diversity term (``-H(mean p)``) that guards against collapse.
    decay_batches
        After a kept re-adaptation, move the adaptable parameters back to their pre-shift values
        linearly over this many observed batches (0: keep them, the published behaviour). A
        statistics adapter (the default ``cb-stats``) catches up with a new domain within a batch or
        two; the re-adapted parameters bridge that gap and then hand back to the parameters the
        statistics adapter runs with. A decay in progress is not part of :meth:`state_dict`: after a
        restart from a checkpoint the parameters keep the values they had when it was written.
    recalibrate_scorer
        Re-fit the scorer's state and threshold on the re-adapted buffer (as published); False
        leaves the scorer to its own online updates.
    restart
        Restart the adaptable parameters from the meta-initialisation and take ``steps`` steps
        (the meta re-adaptation proper); False leaves the parameters alone (onset split only).
    split_onset
        When the batch that confirms a shift, or a held one before it, holds its change point (located
        by :class:`~streamtta.detectors.shift.onset.OnsetLocator` on the arrival order), step again from the
        adapter's state before that batch, in two parts (before / after the change point), and report
        those outputs (:meth:`reprocess`). Normalisation statistics of a batch that
        straddles two domains fit neither; this is the batch a shift costs most on.
    min_segment, onset_alpha
        The locator's smallest part and significance level.
    entropy_tolerance, hist_tolerance
        Roll back when the histogram entropy fell by more than ``hist_tolerance`` (collapse), or
        when the mean entropy rose by more than ``entropy_tolerance`` (nats) without the histogram
        entropy rising by more than ``hist_tolerance`` (a collapsed model is confident, so higher
        entropy with more diverse predictions counts as a recovery).
    """

    def __init__(self, meta_init: Mapping[str, torch.Tensor] | None = None, steps: int = 10, lr: float = 5e-3,
                 buffer_size: int = 512, batch_size: int = 64, recent_batches: int = 3, min_samples: int = 32,
                 diversity_weight: float = 1.0, entropy_tolerance: float = 0.0, hist_tolerance: float = 0.05,
                 decay_batches: int = 0, recalibrate_scorer: bool = True, restart: bool = False,
                 split_onset: bool = True, min_segment: int = 8, onset_alpha: float = 0.01, seed: int = 0) -> None:
        if decay_batches < 0:
            raise ValueError(f"decay_batches must be >= 0, got {decay_batches}")
        if steps < 0 or lr <= 0 or buffer_size < 1 or batch_size < 1:
            raise ValueError(f"need steps >= 0, lr > 0, buffer_size >= 1, batch_size >= 1; got {steps}, {lr}, "
                             f"{buffer_size}, {batch_size}")
        if restart and not meta_init:
            raise ValueError("restart=True needs a meta-initialisation (streamtta meta-train)")
        self.meta_init = {k: v.detach().clone() for k, v in (meta_init or {}).items()}
        self.steps = int(steps)
        self.lr = float(lr)
        self.buffer_size = int(buffer_size)
        self.batch_size = int(batch_size)
        self.recent_batches = int(recent_batches)
        self.min_samples = int(min_samples)
        self.diversity_weight = float(diversity_weight)
        self.entropy_tolerance = float(entropy_tolerance)
        self.hist_tolerance = float(hist_tolerance)
        self.seed = int(seed)
        self.decay_batches = int(decay_batches)
        self.recalibrate_scorer = bool(recalibrate_scorer)
        self.restart = bool(restart)
        self.split_onset = bool(split_onset)
        from streamtta.detectors.shift.onset import OnsetLocator

        self.locator = OnsetLocator(min_segment=min_segment, alpha=onset_alpha, seed=seed)
        #: ``(parameters, pre-shift values, re-adapted values, batches done)`` while decaying
        self._decay: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int] | None = None
        self.buffer: deque[tuple[int, torch.Tensor]] = deque()
        self.n_observed_batches = 0
        self.history: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return sum(len(x) for _, x in self.buffer)

    def observe(self, x_accepted: torch.Tensor, batch_index: int | None = None) -> None:
        """Add one batch of ID-accepted inputs (bounded FIFO buffer, kept with ``restart`` only);
        advances a running decay."""
        b = self.n_observed_batches if batch_index is None else int(batch_index)
        self.n_observed_batches += 1
        self._decay_step()
        if not self.restart:  # only the meta restart reads the buffer: keep checkpoints small
            return
        x = torch.as_tensor(x_accepted).detach().cpu()
        if x.dim() == 0 or len(x) == 0:
            return
        self.buffer.append((b, x.clone()))
        while len(self) - len(self.buffer[0][1]) >= self.buffer_size:
            self.buffer.popleft()
        over = len(self) - self.buffer_size
        if over > 0:
            b0, x0 = self.buffer[0]
            self.buffer[0] = (b0, x0[over:])

    @torch.no_grad()
    def _decay_step(self) -> None:
        if self._decay is None:
            return
        params, start, readapted, done = self._decay
        done += 1
        w = max(0.0, 1.0 - done / self.decay_batches)  # share of the re-adaptation still applied
        for p, a, r in zip(params, start, readapted):
            p.copy_(a + w * (r - a))
        self._decay = None if w == 0.0 else (params, start, readapted, done)

    def _select(self, since_batch: int | None) -> torch.Tensor:
        if not self.buffer:
            return torch.empty(0)
        if since_batch is None:
            tags = sorted({b for b, _ in self.buffer})
            since_batch = tags[-min(self.recent_batches, len(tags))]
        xs = [x for b, x in self.buffer if b >= since_batch]
        x = torch.cat(xs) if xs else torch.empty(0)
        if len(x) < self.min_samples:
            x = torch.cat([x for _, x in self.buffer])[-self.min_samples:]
        return x

    @staticmethod
    def _forward_logits(adapter: Any, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, feats = [], []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                try:
                    lo, fe = adapter.features(x[i:i + batch_size])
                except NotImplementedError:
                    lo, fe = _logits(adapter.model(x[i:i + batch_size])), None
                logits.append(lo)
                feats.append(fe)
        f = None if any(v is None for v in feats) else torch.cat(feats)
        return torch.cat(logits), f

    @property
    def needs_pre_state(self) -> bool:
        """True when :meth:`reprocess` may run: the caller keeps the adapter state before each batch."""
        return self.split_onset

    def reprocess(self, adapter: Any, x: torch.Tensor | Sequence[torch.Tensor],
                  pre_state: Mapping[str, Any] | Sequence[Mapping[str, Any] | None],
                  step: Callable[[torch.Tensor], tuple[Any, ...]]) -> "Reprocessed | None":
        """Process the batch that holds the change point again, in two parts: before and after it.

        ``x`` is the batch that confirmed a shift, or a list of consecutive batches whose outputs are not
        out yet, oldest first (the engine's ``monitor.hold_batches``), with ``pre_state`` the
        ``adapter.state_dict()`` from before it (before each of them). ``step(x_part)`` runs one (gated,
        scored) adapter step and returns ``(StepOutput, scores, flags, keep)``. The change point is located
        over all the batches together. Returns None (adapter untouched) when none is found or it falls on
        a batch boundary; otherwise the adapter is back at the state before the batch holding it (before
        the one preceding it, when the change point is under ``min_segment`` samples into its batch), has
        stepped on the samples before the change point and then on all the samples after it, and the
        outputs of every batch stepped on again are returned, concatenated; ``evidence["first_batch"]`` is
        the position in the list of the first of them, ``evidence["onset_batch"]`` that of the batch
        holding the change point and ``evidence["onset_index"]`` the change point inside it.

        >>> import torch
        >>> from torch import nn
        >>> from streamtta.adapters import build_adapter
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 3)).eval()
        >>> adapter = build_adapter("bn", net, num_classes=3)
        >>> ra = ReAdapter({})
        >>> x = torch.rand(64, 1, 8, 8); x[40:] = x[40:] * 0.2 + torch.randn(24, 1, 8, 8)  # new domain from 40 on
        >>> pre = adapter.state_dict(); _ = adapter.step(x)
        >>> ok = lambda n: np.ones(n, dtype=bool)
        >>> step = lambda part: (adapter.step(part), np.zeros(len(part)), ~ok(len(part)), ok(len(part)))
        >>> redo = ra.reprocess(adapter, x, pre, step)
        >>> redo.evidence["onset_index"], redo.outputs[0].logits.shape
        (40, torch.Size([64, 3]))
        """
        if not self.split_onset:
            return None
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        pres = [pre_state] if isinstance(pre_state, Mapping) else list(pre_state)
        if not xs or len(xs) != len(pres):
            raise ValueError(f"reprocess needs one pre-batch state per batch, got {len(pres)} for {len(xs)}")
        onset = self.locator.locate(torch.cat(xs) if len(xs) > 1 else xs[0])
        if onset is None:
            return None
        starts = np.cumsum([0] + [len(b) for b in xs])
        j = int(np.searchsorted(starts, onset.index, side="right")) - 1  # the batch holding the change point
        i = int(onset.index - starts[j])
        if i == 0:  # between two batches: neither is mixed
            return None
        first = j - 1 if i < self.locator.min_segment and j > 0 else j  # a short head joins the batch before
        if pres[first] is None:
            return None
        adapter.load_state_dict(pres[first])
        head = torch.cat(xs[first:j] + [xs[j][:i]])
        tail = torch.cat([xs[j][i:]] + xs[j + 1:])
        (o1, s1, f1, k1), (o2, s2, f2, k2) = step(head), step(tail)
        info: dict[str, Any] = dict(o1.info)
        for key, v in o2.info.items():  # counts add up; anything else: the later part's value
            old = info.get(key)
            both_counts = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in (old, v))
            info[key] = old + v if both_counts else v
        info["onset_index"] = i
        out = StepOutput(
            logits=torch.cat([o1.logits, o2.logits]), features=torch.cat([o1.features, o2.features]),
            update_mask=torch.cat([o1.update_mask, o2.update_mask]),
            loss=None if o1.loss is None and o2.loss is None else float(np.nanmean(
                [np.nan if o.loss is None else o.loss for o in (o1, o2)])),
            reset=bool(o1.reset or o2.reset), info=info)
        keep = np.concatenate([np.asarray(k1, dtype=bool), np.asarray(k2, dtype=bool)])
        evidence = {"onset_index": i, "batch_size": int(len(xs[j])), "statistic": round(onset.statistic, 3),
                    "p_value": onset.p_value}
        if len(xs) > 1:
            evidence.update(onset_batch=j, first_batch=first, n_batches=len(xs))
        return Reprocessed((out, np.concatenate([np.asarray(s1), np.asarray(s2)]),
                            np.concatenate([np.asarray(f1), np.asarray(f2)]), keep), evidence)

    def on_shift(self, adapter: Any, scorer: Any | None = None, monitor: Any | None = None,
                 event: Any | None = None) -> dict[str, Any]:
        """Re-adapt after a confirmed shift; returns what was done and the proxies before/after."""
        if not self.restart:
            return {"action": "none", "reason": "restart disabled"}
        since = getattr(event, "onset_batch", None) if event is not None else None
        x = self._select(since)
        if len(x) == 0:
            result = {"action": "skipped", "reason": "empty buffer", "n_samples": 0}
            self.history.append(result)
            return result
        model: nn.Module = adapter.model
        params = list(adapter.parameters_to_adapt())
        if self._decay is not None:  # a new shift while the last re-adaptation decays: finish it
            with torch.no_grad():
                for p, a in zip(self._decay[0], self._decay[1]):
                    p.copy_(a)
            self._decay = None
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        snapshot = [p.detach().clone() for p in params]
        logits_before, _ = self._forward_logits(adapter, x, self.batch_size)
        before = prediction_proxies(logits_before)
        n_loaded = 0
        with torch.no_grad():
            for p in params:
                init = self.meta_init.get(names_by_id.get(id(p), ""))
                if init is not None and init.shape == p.shape:
                    p.copy_(init.to(p.device, p.dtype))
                    n_loaded += 1
        gen = torch.Generator().manual_seed(self.seed + len(self.history))
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        requires = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr)
        with ExitStack() as stack:
            try:
                from streamtta.adapters.norms.base import frozen_stats

                stack.enter_context(frozen_stats(model))
            except ImportError:  # pragma: no cover
                pass
            for _ in range(self.steps):
                idx = torch.randperm(len(x), generator=gen)[: self.batch_size]
                logits = _logits(model(x[idx]))
                p_mean = logits.softmax(1).mean(0)
                loss = entropy(logits).mean() + self.diversity_weight * (p_mean * p_mean.clamp_min(1e-12).log()).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        for p, r in zip(params, requires):
            p.grad = None
            p.requires_grad_(r)
        with torch.no_grad():  # undo any statistics side effect of the extra forwards
            for k, v in model.named_buffers():
                if k in buffers and v.shape == buffers[k].shape:
                    v.copy_(buffers[k])
        logits_after, feats_after = self._forward_logits(adapter, x, self.batch_size)
        after = prediction_proxies(logits_after)
        collapsed = after["hist_entropy"] < before["hist_entropy"] - self.hist_tolerance
        un_collapsed = after["hist_entropy"] > before["hist_entropy"] + self.hist_tolerance
        less_sure = after["mean_entropy"] > before["mean_entropy"] + self.entropy_tolerance
        # a collapsed model is confident (low entropy) on a few classes: a restart that spreads the
        # predictions again is kept even though its entropy is higher
        worse = collapsed or (less_sure and not un_collapsed)
        result: dict[str, Any] = {"n_samples": int(len(x)), "steps": self.steps, "n_params_from_meta_init": n_loaded,
                                  "proxies_before": before, "proxies_after": after}
        if worse:
            with torch.no_grad():
                for p, s in zip(params, snapshot):
                    p.copy_(s)
            result["action"] = "rolled_back"
        else:
            result["action"] = "readapted"
            if self.decay_batches > 0:
                self._decay = (params, snapshot, [p.detach().clone() for p in params], 0)
                result["decay_batches"] = self.decay_batches
            if (self.recalibrate_scorer and scorer is not None and hasattr(scorer, "recalibrate")
                    and feats_after is not None):
                try:
                    scorer.recalibrate(feats_after, logits_after)
                    result["scorer_threshold"] = float(scorer.threshold)
                except (ValueError, RuntimeError) as e:
                    result["scorer_error"] = str(e)
            if monitor is not None:
                (getattr(monitor, "reset_reference", None) or monitor.reset)()
        self.history.append(result)
        return result

    #: alias
    readapt = on_shift

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [(b, x.clone()) for b, x in self.buffer], "n_observed_batches": self.n_observed_batches,
                "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore buffer, batch count and history (the meta-initialisation stays the constructor's; a
        buffer saved with ``restart`` is dropped when this re-adapter has none)."""
        self.buffer = (deque((int(b), torch.as_tensor(x).clone()) for b, x in state["buffer"]) if self.restart
                       else deque())
        self.n_observed_batches = int(state["n_observed_batches"])
        self.history = list(state.get("history", []))
