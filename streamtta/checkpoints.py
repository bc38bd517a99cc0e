"""Atomic per-stream checkpoint files that hold data only.

A checkpoint is written to a temporary file in the same directory, fsynced and renamed over the old one.
It holds tensors, numbers, strings, lists and dicts: numpy arrays are stored as tensors (tagged, and
turned back into arrays on load), and files are read with ``torch.load(weights_only=True)``, so loading
one never runs code. A file that cannot be read that way (tampered, truncated, another format) raises
:class:`CheckpointError` naming it. :func:`encode_checkpoint` / :func:`decode_checkpoint` are the same
format as bytes (other stores, e.g. the Kafka changelog of :mod:`streamtta.state_store`, keep those).

>>> import tempfile, numpy as np
>>> store = CheckpointStore(tempfile.mkdtemp())
>>> store.save("t:0", {"n": 3, "means": np.arange(3.0), "name": "x"})
>>> st = store.load("t:0"); st["n"], st["means"].tolist(), st["name"]
(3, [0.0, 1.0, 2.0], 'x')
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "streamtta.checkpoint"
VERSION = 2
_NDARRAY = "__ndarray__"
_LIST_ARRAY = "__list_array__"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded as plain data."""


def to_plain(obj: Any) -> Any:
    """Numpy arrays -> tagged tensors, numpy scalars -> Python numbers, tuples -> lists (recursively)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufc":
            return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj)).clone()}
        return {_LIST_ARRAY: to_plain(obj.tolist()), "dtype": "object" if obj.dtype == object else obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def from_plain(obj: Any) -> Any:
    """The inverse of :func:`to_plain` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if set(obj) == {_NDARRAY}:
            return obj[_NDARRAY].numpy()
        if set(obj) == {_LIST_ARRAY, "dtype"}:
            return np.array(from_plain(obj[_LIST_ARRAY]), dtype=object if obj["dtype"] == "object" else obj["dtype"])
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj


def encode_checkpoint(key: str, state: dict[str, Any], *, seq: int | None = None) -> bytes:
    """The bytes of a checkpoint of ``state`` under ``key`` (``seq``: an optional version number kept
    with it, see :func:`decode_checkpoint`).

    >>> state, meta = decode_checkpoint(encode_checkpoint("t:0", {"n": 1}, seq=7), "example")
    >>> state, meta["key"], meta["seq"]
    ({'n': 1}, 't:0', 7)
    """
    payload: dict[str, Any] = {"format": FORMAT, "version": VERSION, "key": key, "state": to_plain(state)}
    if seq is not None:
        payload["seq"] = int(seq)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def decode_checkpoint(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of checkpoint bytes (``meta``: ``key`` and ``seq``, None when absent), read with
    ``torch.load(weights_only=True)`` only; :class:`CheckpointError` naming ``where`` when they are not a
    checkpoint of this format.

    >>> decode_checkpoint(b"not a checkpoint", "x.pt")
    Traceback (most recent call last):
    ...
    streamtta.checkpoints.CheckpointError: checkpoint x.pt cannot be loaded as plain data: ...
    """
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable input is a CheckpointError naming it
        raise CheckpointError(f"checkpoint {where} cannot be loaded as plain data: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {where} is not a {FORMAT} v{VERSION} file")
    try:
        state = from_plain(payload["state"])
    except Exception as e:  # noqa: BLE001 -- a malformed state is a CheckpointError naming it
        raise CheckpointError(f"checkpoint {where} holds no valid state: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {where} holds no valid state: {type(state).__name__}, not a mapping")
    seq = payload.get("seq")
    return state, {"key": payload.get("key"), "seq": int(seq) if isinstance(seq, int) else None}


def _file_name(text: str, keep: int) -> str:
    """A file-system-safe name for any string: a sanitised prefix plus a hash of the whole string."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:keep]
    return f"{safe}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


class CheckpointStore:
    """One file per state key in ``directory`` (in a sub-directory per ``namespace``, e.g. the consumer
    group, when one is given); file names are a sanitised prefix plus a hash of the key.

    >>> import tempfile
    >>> a = CheckpointStore(tempfile.mkdtemp(), namespace="group-a")
    >>> a.directory.name.startswith("group-a-"), a.path("t:0").name.startswith("t_0-")
    (True, True)
    """

    def __init__(self, directory: str | Path, *, namespace: str | None = None) -> None:
        self.directory = Path(directory)
        if namespace:
            self.directory = self.directory / _file_name(namespace, 40)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / f"{_file_name(key, 80)}.pt"

    def save(self, key: str, state: dict[str, Any]) -> None:
        self.save_bytes(key, encode_checkpoint(key, state))

    def save_many(self, states: dict[str, dict[str, Any]]) -> None:
        """:meth:`save` each of ``states`` (key -> state), in order; stores that can batch writes override it."""
        for key, state in states.items():
            self.save(key, state)

    def save_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` (see :func:`encode_checkpoint`) as the checkpoint of ``key``, atomically."""
        target = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def load_bytes(self, key: str) -> bytes | None:
        """The raw bytes of the checkpoint of ``key``, None when there is none."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def load(self, key: str) -> dict[str, Any] | None:
        """The saved state of ``key``, None when there is none; :class:`CheckpointError` when the file is
        not a checkpoint of this format (never executes anything from it)."""
        data = self.load_bytes(key)
        return None if data is None else decode_checkpoint(data, str(self.path(key)))[0]

    def reject(self, key: str) -> Path:
        """Move a bad checkpoint aside (``*.rejected``) so that the stream can start fresh."""
        p = self.path(key)
        dest = p.with_name(p.name + ".rejected")
        os.replace(p, dest)
        return dest
