"""Secret redaction: configuration values, command lines and log records never show a secret.

A key is secret if it is one of the secret librdkafka / Kafka client properties in :data:`SECRET_KEYS`
(librdkafka marks its own with ``_RK_SENSITIVE`` in ``rdkafka_conf.c``; the Java client names are
there too because people paste them) or if its name contains one of :data:`SECRET_WORDS`
(case-insensitive). A dotted name counts by its last component(s), so ``kafka.security.sasl.password``
is secret wherever it is written.

* :func:`redact` -- a copy of a nested dict/list with the value of every secret key replaced by
  :data:`MARKER` (and, optionally, known secret strings masked inside every other string);
* :func:`redact_argv` -- a command line with every ``secret.key=value`` argument's value masked;
* :func:`redact_text` -- ``key=value`` / ``'key': 'value'`` pairs with a secret key masked in free text;
* :func:`secret_values` -- the secret strings a :class:`~streamtta.config.Config` holds;
* :func:`redacted_config` -- ``cfg.to_dict()`` redacted (``streamtta config show``, the run manifest);
* :class:`SecretFilter` and :func:`install_redaction` -- a logging filter on the root handlers that masks
  both in every log record.

The resolved :class:`~streamtta.config.Config` keeps the real values (the Kafka clients need them); only
what is written or printed goes through these functions.

>>> redact({"kafka": {"security": {"sasl.password": "hunter2", "sasl.mechanism": "PLAIN"}}})
{'kafka': {'security': {'sasl.password': '***', 'sasl.mechanism': 'PLAIN'}}}
>>> redact_text("--set kafka.security.sasl.password=hunter2")
'--set kafka.security.sasl.password=***'
>>> is_secret_key("API_Token"), is_secret_key("sasl.mechanism")
(True, False)
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MARKER", "SECRET_KEYS", "SECRET_WORDS", "SecretFilter", "install_redaction", "is_secret_key",
           "mask_values", "redact", "redact_argv", "redact_text", "redacted_config", "secret_values"]

#: What a secret value is replaced with.
MARKER = "***"

#: Client properties that hold a secret (or, for librdkafka's ``ssl.key.location``, point at one).
#: librdkafka's ``_RK_SENSITIVE`` properties, the secret ones it does not flag, and Java-client names.
SECRET_KEYS: frozenset[str] = frozenset({
    # librdkafka, flagged _RK_SENSITIVE
    "sasl.username", "sasl.password", "sasl.oauthbearer.config", "ssl.key.location", "ssl.key.password",
    "ssl.key.pem", "ssl_key", "ssl.ca.pem", "ssl.keystore.password",
    # librdkafka, secret but not (always) flagged
    "sasl.oauthbearer.client.secret", "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.assertion.private.key.passphrase", "sasl.oauthbearer.assertion.private.key.file",
    # Java client names (librdkafka rejects them, but they end up in config files)
    "sasl.jaas.config", "ssl.truststore.password", "ssl.keystore.key", "ssl.keystore.certificate.chain",
    "ssl.truststore.certificates", "basic.auth.user.info", "sasl.client.callback.handler.class.secret",
})

#: A key whose name contains one of these (case-insensitive) is secret too.
SECRET_WORDS: tuple[str, ...] = ("password", "passwd", "passphrase", "secret", "token", "credential", "private")

_KEY_RE = re.compile("|".join(re.escape(k) for k in sorted(SECRET_KEYS, key=len, reverse=True)), re.IGNORECASE)
_WORDS_RE = re.compile("|".join(SECRET_WORDS), re.IGNORECASE)
# ``key=value``, ``key: value``, ``'key': 'value'``, ``"key"="value"`` with a key holding a secret name
_NAME = f"[\\w.\\-]*(?:{_KEY_RE.pattern}|{_WORDS_RE.pattern})[\\w.\\-]*"
_PAIR_RE = re.compile(rf"""(?P<key>{_NAME})(?P<sep>['"]?\s*[=:]\s*)"""
                      r"""(?:(?P<q>['"])(?P<qv>.*?)(?P=q)|(?P<v>[^\s'",;}\])]+))""", re.IGNORECASE)


def is_secret_key(key: Any) -> bool:
    """Whether a config key (plain or dotted) names a secret.

    >>> [is_secret_key(k) for k in ("ssl.key.password", "kafka.security.ssl_key", "batch_size")]
    [True, True, False]
    """
    k = str(key).lower()
    if _WORDS_RE.search(k):
        return True
    parts = k.split(".")
    return any(".".join(parts[i:]) in SECRET_KEYS for i in range(len(parts)))


def mask_values(text: str, values: Iterable[str]) -> str:
    """``text`` with every occurrence of each of ``values`` replaced by :data:`MARKER` (longest first)."""
    for v in sorted({v for v in values if v}, key=len, reverse=True):
        text = text.replace(v, MARKER)
    return text


def redact_text(text: str, values: Iterable[str] = ()) -> str:
    """Free text with the value of every ``secret_key=value`` pair, and every string of ``values``, masked.

    >>> redact_text("conf {'sasl.password': 'a b', 'acks': 'all'}")
    "conf {'sasl.password': '***', 'acks': 'all'}"
    """
    def sub(m: re.Match[str]) -> str:
        value = f"{m['q']}{MARKER}{m['q']}" if m["q"] else MARKER
        return f"{m['key']}{m['sep']}{value}"

    return _PAIR_RE.sub(sub, mask_values(text, values))


_ARG_RE = re.compile(r"(?P<head>(?:--?[\w-]+=)?(?P<key>[\w.\-]+)=)(?P<value>.*)", re.DOTALL)


def redact_argv(argv: Iterable[str], values: Iterable[str] = ()) -> list[str]:
    """A command line with secrets masked: the whole value of every ``[--flag=]secret.key=value``
    argument (``--set kafka.security.sasl.password=...``), then :func:`redact_text` on every argument.

    >>> redact_argv(["streamtta", "--set", "kafka.security.sasl.jaas.config=Login required password=x;"])
    ['streamtta', '--set', 'kafka.security.sasl.jaas.config=***']
    """
    vals = tuple(values)
    out = []
    for arg in map(str, argv):
        m = _ARG_RE.fullmatch(arg)
        if m and m["value"] and is_secret_key(m["key"]):
            arg = m["head"] + MARKER
        out.append(redact_text(arg, vals))
    return out


def redact(obj: Any, values: Iterable[str] = ()) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples, strings) in which the value of every secret key is
    :data:`MARKER` (``None`` stays ``None``), and every string is passed through :func:`redact_text` with
    ``values`` (the known secret strings, e.g. :func:`secret_values`). ``obj`` is not modified.

    >>> redact({"producer": {"my_api_token": {"a": 1}}, "argv": ["x", "ssl.key.password=pw"]})
    {'producer': {'my_api_token': '***'}, 'argv': ['x', 'ssl.key.password=***']}
    """
    vals = tuple(values)
    if isinstance(obj, dict):
        return {k: (MARKER if v is not None and is_secret_key(k) else redact(v, vals)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, vals) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, vals)
    return obj


def redacted_config(cfg: Any) -> dict[str, Any]:
    """``cfg.to_dict()`` with its secrets redacted (:func:`redact` with :func:`secret_values`).

    >>> from streamtta.config import Config
    >>> redacted_config(Config(kafka={"security": {"ssl.key.password": "pw"}}))["kafka"]["security"]
    {'ssl.key.password': '***'}
    """
    return redact(cfg.to_dict(), secret_values(cfg))


#: Secret values shorter than this are not masked inside free text (a one-letter user name would blank out
#: that letter everywhere); under their keys they are always redacted.
MIN_MASKED_CHARS = 4


def secret_values(obj: Any) -> set[str]:
    """Every string (or number, as text) of at least :data:`MIN_MASKED_CHARS` characters held under a secret
    key anywhere in ``obj``: a :class:`~streamtta.config.Config` (or anything with ``to_dict``/``model_dump``)
    or nested dicts/lists. These are the values masked inside free text (log lines).

    >>> sorted(secret_values({"kafka": {"security": {"sasl.password": "hunter2", "sasl.mechanism": "PLAIN"}}}))
    ['hunter2']
    """
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    elif hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    out: set[str] = set()

    def walk(o: Any, secret: bool) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, secret or is_secret_key(k))
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, secret)
        elif secret and o is not None and not isinstance(o, bool) and len(str(o)) >= MIN_MASKED_CHARS:
            out.add(str(o))  # shorter values are still redacted by key, but not searched for in free text

    walk(obj, False)
    return out


class SecretFilter(logging.Filter):
    """Masks secrets in a log record in place (message, arguments, exception and stack text): the known
    secret strings it was given (:meth:`add`) and any ``secret_key=value`` pair. Never drops a record."""

    def __init__(self) -> None:
        super().__init__()
        self.values: set[str] = set()

    def add(self, values: Iterable[str]) -> None:
        self.values.update(v for v in values if v)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 -- a bad format string: leave it to the handler to report
            return True
        record.msg, record.args = redact_text(msg, self.values), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.values)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.values)
        return True


#: The process-wide filter :func:`install_redaction` puts on the root logger's handlers.
FILTER = SecretFilter()


def install_redaction(cfg: Any = None, handlers: Iterable[logging.Handler] | None = None) -> SecretFilter:
    """Mask ``cfg``'s secret values (see :func:`secret_values`) in every record the given handlers
    (default: the root logger's) emit, from now on. Safe to call again: the filter is added once per
    handler and the values accumulate. Returns the process-wide :data:`FILTER`."""
    if cfg is not None:
        FILTER.add(secret_values(cfg))
    for h in (logging.getLogger().handlers if handlers is None else handlers):
        if FILTER not in h.filters:
            h.addFilter(FILTER)
    return FILTER
