"""Spec strings: name an adapter as ``norm + objective + filters + guards``.

Grammar (names are case-insensitive; ``_`` and ``-`` are interchangeable)::

    spec  := term ("+" term)*
    term  := NAME [ "(" [ KEY "=" VALUE ("," KEY "=" VALUE)* ] ")" ]
    VALUE := int | float | true | false | none | bare-word

Terms, by kind (aliases in brackets):

* **norm** (at most one): ``source`` (no adaptation: BatchNorm with source statistics),
  ``bn`` [bn-adapt, tbn] (test-batch statistics), ``rbn`` [rotta-stats, robust-bn] (RoTTA's
  robust EMA statistics), ``unmix-tns`` [unmix, unmixtns] (UnMix-TNS as published),
  ``cb-stats`` [cbn, class-balanced] (test-batch statistics corrected for the batch's class mix,
  see :mod:`streamtta.adapters.norms.class_balanced`), ``align`` (LayerNorm / GroupNorm models: their
  outputs re-standardised per channel onto the source statistics, see :mod:`streamtta.adapters.norms.aligned`);
* **objective** (at most one): ``tent`` [entropy], ``eata-loss`` (exp(E0-H)-weighted entropy);
* **filter** (any, applied in the order written): ``conf-drop`` (open-set confidence-drop),
  ``ent-margin`` (EATA reliability, H < E0), ``redundancy`` (EATA non-redundancy);
* **guard** (any): ``sar-reset`` (entropy-EMA reset), ``periodic`` (RDumb), ``ema-source``
  [ema-to-source] (weight ensembling towards the source), ``source-fallback`` [fallback] (return
  the source model's prediction on batches where it agrees with the adapted one, i.e. benign domains);
* **macros** expand in place: ``eata`` [eta] = ``eata-loss+ent-margin+redundancy``;
  ``ostta`` = ``tent+conf-drop``; ``rdumb`` = ``eata+periodic(every=1000)``; ``default`` =
  :data:`DEFAULT_SPEC` (``build_adapter("default", model, C)`` picks per model, see
  :mod:`streamtta.adapters.defaults`).

Rules: a spec with an objective but no norm uses ``bn`` (so ``"tent"`` is ``"bn+tent"``); a
norm alone is a gradient-free adapter (``"unmix-tns"`` is UnMix-TNS with no gradient step,
``"source"`` does nothing); filters and the ``sar-reset``/``ema-source`` guards need an
objective; no term twice. Optimizer arguments (``lr``, ``optimizer``, ``sgd_momentum``,
``weight_decay``) go on the objective term, e.g.
``"unmix-tns(K=8)+tent(lr=1e-4)+conf-drop+ema-source(momentum=0.99)"``; the pseudo-label
arguments of the adapter (``prepass``, ``relabel``) go on the ``cb-stats`` term.

``build_adapter(spec, model, num_classes, **overrides)`` also takes flat keyword overrides that
beat the spec's own arguments: see :data:`OVERRIDE_KEYS` (``lr``, ``optimizer``, ``K``,
``bs_max``, ``tau``, ``e_margin``, ``d_margin``, ``conf_margin``, ``reset_threshold``,
``reset_every``, ``ema_momentum``, ``rbn_alpha``, ``shift_rate``, ``feature_layer``, ``seed``
...). A key that no component knows is an error; a known key the spec does not use is ignored
(listed in ``adapter.ignored_overrides``).

This module gathers the spec API; the code lives in :mod:`streamtta.adapters.terms` (the term
registry), :mod:`streamtta.adapters.grammar` (parsing) and :mod:`streamtta.adapters.build`
(building).

>>> str(parse_spec("tent"))
'bn+tent'
>>> str(parse_spec("UnMix(K=8) + eata"))
'unmix-tns(K=8)+eata-loss+ent-margin+redundancy'
>>> try:
...     parse_spec("bn+tnet")
... except SpecError as e:
...     print(str(e)[:60])
unknown term 'tnet' in spec 'bn+tnet' (did you mean 'tent'?)
"""
from streamtta.adapters.build import COMPONENT_BUILDERS, build_adapter
from streamtta.adapters.grammar import AdapterSpec, SpecError, SpecTerm, coerce_arg, parse_spec, suggest
from streamtta.adapters.terms import (
    ADAPTER_ARGS,
    ALIASES,
    DEFAULT_SPEC,
    GLOBAL_OVERRIDES,
    LABEL_ARGS,
    MACROS,
    OVERRIDE_KEYS,
    TERMS,
    TermInfo,
)

__all__ = [
    "ADAPTER_ARGS", "ALIASES", "COMPONENT_BUILDERS", "DEFAULT_SPEC", "GLOBAL_OVERRIDES", "LABEL_ARGS", "MACROS",
    "OVERRIDE_KEYS", "TERMS", "AdapterSpec", "SpecError", "SpecTerm", "TermInfo", "build_adapter", "coerce_arg",
    "parse_spec", "suggest",
]
