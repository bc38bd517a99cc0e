"""Online, :class:`ReAdapter` answers a confirmed shift in two ways:

* **onset split** (``split_onset``, on by default): when the change point lies inside the batch that
  confirmed the shift, or inside one before it whose predictions the engine still holds
  (``hold_batches``; :class:`~streamtta.detectors.shift.onset.OnsetLocator` on the arrival order), the
  engine's adapter goes back to its state before the batch holding it and steps again in two parts,
  before and after the change point, and those outputs are reported (:meth:`ReAdapter.reprocess`).
  Statistics of a batch that straddles two domains fit neither part; it is the batch a shift costs
  most on, and no monitor can confirm a shift before it has been seen;
* **meta restart** (``restart``; the engine turns it on by default for some gradient specs, see
  :func:`~streamtta.readapt.meta_init.default_restart_init`): it keeps a bounded buffer of recent
  ID-accepted inputs, snapshots the adapter's parameters, restarts them from ``theta*``, takes a few
  entropy (+ diversity) steps on the post-shift part of the buffer, re-fits the scorer
  (prototypes/means and threshold) and resets the shift monitor's references; it rolls back to the
  snapshot when the unsupervised proxies got worse (mean entropy up, prediction-histogram entropy
  down = collapse, or less agreement with the adapter's frozen source copy = confidently wrong).

The hold window lives here too: a pipeline keeps each batch's result for ``hold_batches`` more
batches (:attr:`ReAdapter.hold`), with the adapter state from before it (:meth:`ReAdapter.pre_state`),
and once a shift is confirmed calls :meth:`ReAdapter.reprocess_held` on the held results and the
current one: the results of the batches stepped on again get the new outputs in place. ``ReAdapter`` defaults
to ``restart=False``; when to turn it on is the engine's choice (README, "Meta restart by default").
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from streamtta.readapt.restart import entropy_steps, got_worse, load_init, measure, source_predictions
from streamtta.types import StepOutput


# ----------------------------------------------------------------------------------------------
# online re-adaptation
# ----------------------------------------------------------------------------------------------
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
    hold_batches
        With ``split_onset``: how many batches a pipeline holds back (results not final) so that a shift
        confirmed that many batches late can still re-process the batch it began in.
    entropy_tolerance, hist_tolerance
        Roll back when the histogram entropy fell by more than ``hist_tolerance`` (collapse), or
        when the mean entropy rose by more than ``entropy_tolerance`` (nats) without the histogram
        entropy rising by more than ``hist_tolerance`` (a collapsed model is confident, so higher
        entropy with more diverse predictions counts as a recovery).
    agreement_tolerance
        Also roll back when the share of buffer samples on which the model agrees with the adapter's
        frozen source copy (source affine parameters, current statistics) fell by more than this; None
        (or 1.0) turns the check off. Adapters without a source copy skip it.
    """

    def __init__(self, meta_init: Mapping[str, torch.Tensor] | None = None, steps: int = 10, lr: float = 5e-3,
                 buffer_size: int = 512, batch_size: int = 64, recent_batches: int = 3, min_samples: int = 32,
                 diversity_weight: float = 1.0, entropy_tolerance: float = 0.0, hist_tolerance: float = 0.05,
                 decay_batches: int = 0, recalibrate_scorer: bool = True, restart: bool = False,
                 split_onset: bool = True, min_segment: int = 8, onset_alpha: float = 0.01, seed: int = 0,
                 hold_batches: int = 1, agreement_tolerance: float | None = 0.0) -> None:
        if not 0 <= hold_batches <= 8:
            raise ValueError(f"hold_batches must be in 0..8, got {hold_batches}")
        if decay_batches < 0:
            raise ValueError(f"decay_batches must be >= 0, got {decay_batches}")
        if steps < 0 or lr <= 0 or buffer_size < 1 or batch_size < 1:
            raise ValueError(f"need steps >= 0, lr > 0, buffer_size >= 1, batch_size >= 1; got {steps}, {lr}, "
                             f"{buffer_size}, {batch_size}")
        if agreement_tolerance is not None and not 0.0 <= float(agreement_tolerance) <= 1.0:  # NaN too
            raise ValueError(f"agreement_tolerance must be in [0, 1] or None, got {agreement_tolerance}")
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
        self.agreement_tolerance = None if agreement_tolerance is None else float(agreement_tolerance)
        self.seed = int(seed)
        self.decay_batches = int(decay_batches)
        self.recalibrate_scorer = bool(recalibrate_scorer)
        self.restart = bool(restart)
        self.split_onset = bool(split_onset)
        self.hold_batches = int(hold_batches)
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

    @property
    def hold(self) -> int:
        """Batches whose results wait for the next ones (0 without the onset split)."""
        return self.hold_batches if self.split_onset else 0

    def pre_state(self, adapter: Any, batch_index: int, monitor: Any | None) -> dict[str, Any] | None:
        """The adapter state before a batch, when a re-processing may need it: not while the monitor's
        cooldown rules out a confirmation on this batch and on the batches that hold it."""
        if not self.split_onset:
            return None
        if monitor is not None and batch_index + self.hold <= getattr(monitor, "cooldown_until", -1):
            return None
        return adapter.state_dict()

    def reprocess_held(self, adapter: Any, window: Sequence[Any],
                       step: Callable[[torch.Tensor], tuple[Any, ...]]) -> dict[str, Any] | None:
        """After a confirmed shift: re-process the batch holding the change point among ``window`` (the
        held results and the current one, oldest first; each with ``x``, ``pre_state``, ``out``,
        ``ood_scores``, ``ood_flags``, ``keep``, ``batch_index``) via :meth:`reprocess`.

        The last result (the current batch) gets new outputs, scores and flags; an earlier one, which the
        scorer memories have already learned, gets the new outputs and keeps its first scores and flags
        (scored again, its samples would match themselves in the memories), and is marked ``revised``.
        The current batch's ``info`` counts cover every sample stepped on again. Returns the alert
        evidence, or None (nothing changed). Afterwards no result keeps its ``pre_state``: states from
        before this shift are never reused."""
        try:
            start = next((i for i, b in enumerate(window) if b.pre_state is not None), None)
            if start is None:
                return None
            group = list(window[start:])
            redo = self.reprocess(adapter, [b.x for b in group], [b.pre_state for b in group], step)
            if redo is None:
                return None
            out, scores, flags, keep = redo.outputs
            evidence = dict(redo.evidence)
            first, onset_batch = evidence.pop("first_batch", 0), evidence.pop("onset_batch", 0)
            evidence.pop("n_batches", None)
            evidence["onset_batch"] = group[onset_batch].batch_index
            evidence["batches"] = [b.batch_index for b in group[first:]]
            cur, at = group[-1], 0
            for pos, b in enumerate(group[first:], start=first):
                sl = slice(at, at + len(b))
                info = dict(out.info if b is cur else b.out.info)
                info.pop("onset_index", None)
                if pos == onset_batch:
                    info["onset_index"] = evidence["onset_index"]
                b.out = StepOutput(logits=out.logits[sl], features=out.features[sl],
                                   update_mask=out.update_mask[sl], loss=out.loss,
                                   reset=out.reset if b is cur else b.out.reset, info=info)
                if b is cur:
                    b.ood_scores, b.ood_flags, b.keep = scores[sl], flags[sl], keep[sl]
                else:
                    b.revised = True
                at += len(b)
            return evidence
        finally:
            for b in window:
                b.pre_state = None

    def on_shift(self, adapter: Any, scorer: Any | None = None, monitor: Any | None = None,
                 event: Any | None = None) -> dict[str, Any]:
        """With ``restart``: restart the adaptable parameters from the meta-initialisation, take ``steps``
        entropy steps on the post-shift part of the buffer, keep the result unless the proxies got worse
        (then roll back), re-fit the scorer and reset the monitor's references. Returns what was done."""
        if not self.restart:
            return {"action": "none", "reason": "restart disabled"}
        since = getattr(event, "onset_batch", None) if event is not None else None
        x = self._select(since)
        first = next(iter(adapter.parameters_to_adapt()), None)
        if first is not None:  # the buffer is kept on the CPU; the model may live on a GPU
            x = x.to(first.device)
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
        snapshot = [p.detach().clone() for p in params]
        reference = source_predictions(adapter, x, self.batch_size)
        before = measure(adapter, x, self.batch_size, reference)[0]
        n_loaded = load_init(model, params, self.meta_init)
        gen = torch.Generator().manual_seed(self.seed + len(self.history))
        entropy_steps(model, params, x, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                      diversity_weight=self.diversity_weight, generator=gen)
        after, logits_after, feats_after = measure(adapter, x, self.batch_size, reference)
        result: dict[str, Any] = {"n_samples": int(len(x)), "steps": self.steps, "n_params_from_meta_init": n_loaded,
                                  "proxies_before": before, "proxies_after": after}
        if got_worse(before, after, entropy_tolerance=self.entropy_tolerance, hist_tolerance=self.hist_tolerance,
                     agreement_tolerance=self.agreement_tolerance):
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
