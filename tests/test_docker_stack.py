"""The Docker stack in docker/ agrees with itself and with the code: no Docker engine runs here, so the
files are parsed and cross-checked (services, listeners, topics, flags, ports, scrape targets, dashboard).

PyYAML is not a dependency of the project: :func:`load_yaml` reads the YAML subset these files use (block
mappings and sequences, ``|`` literal blocks, one-line flow sequences, quoted and plain scalars) and raises
on anything else (anchors, tags, flow mappings), so a file that leaves the subset fails loudly.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import zlib
from functools import cache
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"

#: metric names agreed for issue 17 (histograms are queried through their _bucket/_sum/_count series)
COUNTERS = {"streamtta_records_total", "streamtta_ood_total", "streamtta_alerts_total", "streamtta_shifts_total",
            "streamtta_adapter_resets_total", "streamtta_readaptations_total"}
GAUGES = {"streamtta_consumer_lag", "streamtta_ood_ratio", "streamtta_states"}
HISTOGRAMS = {f"streamtta_{h}_seconds" for h in ("batch", "step", "checkpoint", "commit")}
AGREED = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def _strip_comment(s: str) -> str:
    quote = None
    for i, c in enumerate(s):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#" and (i == 0 or s[i - 1] in " \t"):
            return s[:i].rstrip()
    return s.rstrip()


def _scalar(s: str):
    s = _strip_comment(s)
    if s[:1] in ("&", "*", "!", "{", "|", ">") or s.startswith("<<"):
        raise ValueError(f"YAML construct outside the supported subset: {s!r}")
    if s.startswith("["):
        return json.loads(s)  # one-line flow sequences of JSON scalars only
    if s.startswith('"'):
        return json.loads(s)
    if s.startswith("'"):
        return s[1:-1].replace("''", "'")
    if re.fullmatch(r"[-+]?\d+", s):
        return int(s)
    if re.fullmatch(r"[-+]?\d+\.\d+", s):
        return float(s)
    return {"true": True, "false": False, "null": None, "~": None, "": None}.get(s, s)


_KEY = re.compile(r"""^("(?:[^"\\]|\\.)*"|'[^']*'|[^\s"'\[{#-][^:]*?|-[^\s:][^:]*?)\s*:(?:\s+|$)(.*)$""")


class _Yaml:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    def peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if _strip_comment(line).strip():
                return len(line) - len(line.lstrip(" ")), line.strip()
            self.i += 1
        return None

    def block(self, indent: int):
        _, content = self.peek()
        return self.seq(indent) if content == "-" or content.startswith("- ") else self.mapping(indent)

    def mapping(self, indent: int) -> dict:
        out = {}
        while (nxt := self.peek()) and nxt[0] == indent and not (nxt[1] == "-" or nxt[1].startswith("- ")):
            m = _KEY.match(nxt[1])
            if not m:
                raise ValueError(f"line {self.i + 1}: not a 'key: value' line: {nxt[1]!r}")
            self.i += 1
            out[_scalar(m.group(1))] = self.value(m.group(2), indent)
        if nxt and nxt[0] > indent:
            raise ValueError(f"line {self.i + 1}: unexpected indentation")
        return out

    def seq(self, indent: int) -> list:
        out = []
        while (nxt := self.peek()) and nxt[0] == indent and (nxt[1] == "-" or nxt[1].startswith("- ")):
            rest = nxt[1][1:].lstrip()
            if _KEY.match(rest):  # "- key: value" opens a mapping at the column of "key"
                col = indent + len(nxt[1]) - len(rest)
                self.lines[self.i] = " " * col + rest
                out.append(self.mapping(col))
            else:
                self.i += 1
                out.append(self.value(rest, indent))
        return out

    def value(self, rest: str, indent: int):
        rest = _strip_comment(rest)
        if rest in ("|", "|-"):
            return self.literal(indent, keep_newline=rest == "|")
        if rest:
            return _scalar(rest)
        nxt = self.peek()
        if nxt and (nxt[0] > indent or (nxt[0] == indent and (nxt[1] == "-" or nxt[1].startswith("- ")))):
            return self.block(nxt[0])
        return None

    def literal(self, indent: int, keep_newline: bool) -> str:
        body: list[str] = []
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
                break
            body.append(line)
            self.i += 1
        body = "\n".join(body).rstrip().split("\n")
        cut = min(len(b) - len(b.lstrip(" ")) for b in body if b.strip())
        text = "\n".join(b[cut:] for b in body)
        return text + "\n" if keep_newline else text


def load_yaml(text: str):
    doc = _Yaml(text)
    out = doc.block(doc.peek()[0])
    if doc.peek():
        raise ValueError(f"line {doc.i + 1}: not parsed: {doc.lines[doc.i]!r}")
    return out


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's variable interpolation of the forms used here: ``${VAR:-default}``, ``${VAR}``, ``$$``."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        return "$" if m.group(0) == "$$" else env.get(m.group(1)) or m.group(2) or ""
    return re.sub(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}", sub, value)


@cache
def compose() -> dict:
    return interpolate(load_yaml((DOCKER / "docker-compose.yml").read_text()))


def services() -> dict:
    return compose()["services"]


def commands(svc: dict) -> list[list[str]]:
    """The simple commands a service runs: its exec-form command, or each command of its ``sh -c`` script."""
    entry, cmd = svc.get("entrypoint") or [], svc.get("command") or []
    if entry[-1:] != ["-c"]:
        return [list(entry) + list(cmd)] if cmd else []
    lexer = shlex.shlex(cmd[0].replace("\\\n", " "), posix=True, punctuation_chars=";&|\n")
    lexer.whitespace, lexer.whitespace_split = " \t", True
    out, cur = [], []
    for tok in lexer:
        if set(tok) <= set(";&|\n"):
            out, cur = (out + [cur] if cur else out), []
        else:
            cur.append(tok)
    return out + [cur] if cur else out


def invocations(program: str) -> list[tuple[str, list[str]]]:
    return [(name, c) for name, svc in services().items() for c in commands(svc)
            if c and Path(c[0]).name == program]


def opt(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def workers() -> list[list[str]]:
    found = [c for _, c in invocations("streamtta") if c[1] == "run"]
    assert found, "no service runs `streamtta run`"
    return found


def created_topics() -> dict[str, dict]:
    """``kafka-topics.sh --create`` calls of the compose file: topic -> partitions, replication, configs."""
    out = {}
    for _, c in invocations("kafka-topics.sh"):
        if "--create" in c:
            configs = dict(c[i + 1].split("=", 1) for i, a in enumerate(c) if a == "--config")
            out[opt(c, "--topic")] = {"partitions": int(opt(c, "--partitions")), "configs": configs,
                                      "rf": int(opt(c, "--replication-factor")),
                                      "bootstrap": opt(c, "--bootstrap-server")}
    return out


def listeners(var: str) -> dict[str, tuple[str, int]]:
    items = [i.split("://") for i in str(services()["kafka"]["environment"][var]).split(",")]
    return {name: (addr.rsplit(":", 1)[0], int(addr.rsplit(":", 1)[1])) for name, addr in items}


def test_yaml_subset_parser_reads_what_the_files_use_and_refuses_the_rest():
    doc = ('a: 1  # c\nb:\n  - x\n  - "y: z"\n  - k: v\n    n: [1, "two"]\n  - \'it\'\'s\'\nc: |\n  line # kept\n'
           '    more\nd: ${X:-p:1}\ne:\n  f: true\n')
    assert load_yaml(doc) == {"a": 1, "b": ["x", "y: z", {"k": "v", "n": [1, "two"]}, "it's"],
                              "c": "line # kept\n  more\n", "d": "${X:-p:1}", "e": {"f": True}}
    assert interpolate(load_yaml(doc))["d"] == "p:1" and interpolate("${X:-p}", {"X": "q"}) == "q"
    for bad in ("a: &anchor 1\n", "a: {b: 1}\n", "a: !tag x\n", "a:\n  b: 1\n   c: 2\n", "a: [b, c]\n"):
        with pytest.raises(ValueError):
            load_yaml(bad)


def test_depends_on_names_existing_services_with_satisfiable_conditions():
    svcs = services()
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            if cond == "service_healthy":
                assert svcs[dep].get("healthcheck", {}).get("test"), f"{name} waits for {dep} healthy: no healthcheck"
            elif cond == "service_completed_successfully":
                assert svcs[dep].get("restart", "no") == "no", f"{dep} restarts: it never completes for {name}"
            else:
                assert cond == "service_started", cond
    used = {v.split(":")[0] for s in svcs.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert used <= set(compose().get("volumes") or {}), "named volumes must be declared"
    for s in svcs.values():
        for v in s.get("volumes", []):
            if v.startswith("."):
                assert (DOCKER / v.split(":")[0]).exists(), f"bind mount source missing: {v}"


def test_workers_are_a_long_running_group_of_replicas():
    w = services()["worker"]
    assert int(w["deploy"]["replicas"]) >= 2
    assert w.get("restart") in ("always", "unless-stopped", "on-failure")
    argvs = workers()
    assert all("--no-replay" in a and "--max-records" not in a for a in argvs)
    assert len({(opt(a, "--topic"), opt(a, "--group-id")) for a in argvs}) == 1, "one topic, one group"


def test_clients_bootstrap_on_an_advertised_kafka_listener():
    adv, bound = listeners("KAFKA_ADVERTISED_LISTENERS"), listeners("KAFKA_LISTENERS")
    kafka_names = {"kafka", services()["kafka"].get("hostname")}
    internal = {f"{h}:{p}" for n, (h, p) in adv.items() if h in kafka_names and bound[n][1] == p}
    assert internal, "no listener advertised under the kafka service name"
    clients = [opt(c, "--bootstrap-servers") for _, c in invocations("streamtta")]
    clients += [t["bootstrap"] for t in created_topics().values()]
    assert clients and set(clients) <= internal, f"{set(clients)} not among {internal}"
    published = {int(p.split(":")[0]): int(p.split(":")[1]) for p in services()["kafka"]["ports"]}
    host_listeners = [(n, p) for n, (h, p) in adv.items() if h == "localhost"]
    assert host_listeners and all(published.get(p) == bound[n][1] for n, p in host_listeners)


def test_init_service_creates_every_topic_the_workers_use():
    from streamtta.config.models import KafkaConfig

    topics = created_topics()
    brokers = len(str(services()["kafka"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]).split(","))
    assert all(t["rf"] <= brokers for t in topics.values()), "replication factor above the broker count"
    for argv in workers():
        k = KafkaConfig(topic=opt(argv, "--topic"), group_id=opt(argv, "--group-id"))
        needed = [k.topic, k.resolved_predictions_topic(), k.resolved_alerts_topic(), k.resolved_dlq_topic()]
        missing = [t for t in needed if t not in topics]
        assert not missing, f"topics the workers use but nobody creates: {missing}"
        assert topics[k.topic]["partitions"] >= services()["worker"]["deploy"]["replicas"], "idle replicas"
        changelog = f"{k.topic}.{k.group_id}.state"  # names17: <input topic>.<group id>.state
        assert changelog in topics and topics[changelog]["configs"].get("cleanup.policy") == "compact"
    for _, argv in invocations("streamtta"):
        assert opt(argv, "--topic") in topics, f"{argv[:2]} uses a topic nobody creates"


def test_producer_replays_the_workers_model_over_every_partition():
    import inspect

    from streamtta.runner import resolve_scenario
    from streamtta.simulations.scenario import load_scenario
    from streamtta.simulations.scenario.simstream import SimStream

    assert 'f"{scenario.name}:{self.seed}"' in inspect.getsource(SimStream), "stream id format changed"
    producers = [c for _, c in invocations("streamtta") if c[1] == "produce"]
    assert producers
    topic = opt(workers()[0], "--topic")
    parts = created_topics()[topic]["partitions"]
    keys = set()
    for argv in producers:
        scenario = load_scenario(resolve_scenario(argv[2]))
        assert opt(argv, "--topic") == topic
        assert all(opt(w, "--model") == scenario.model for w in workers()), "workers expect another model"
        keys.add(f"{scenario.name}:{opt(argv, '--seed') or 0}")
    # librdkafka's default partitioner (consistent_random) puts a keyed record on CRC-32(key) % partitions
    assert {zlib.crc32(k.encode()) % parts for k in keys} == set(range(parts)), "some partitions get no records"


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_streamtta_flag_in_compose_is_accepted_by_the_cli():
    from streamtta.cli import build_parser

    parser = build_parser()
    for _, argv in invocations("streamtta"):  # values of the known flags (types, choices), positionals
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit):
            parser.parse_known_args(argv[1:])
        assert not err.getvalue(), f"{argv}: {err.getvalue()}"
    unknown = sorted({f"{argv[1]} {a}" for _, argv in invocations("streamtta") for a in argv if a.startswith("--")
                      and a.split("=")[0] not in _subparser(parser, argv[1])._option_string_actions})
    assert not unknown, f"flags used in docker-compose.yml that the CLI does not accept: {unknown}"


def test_metrics_port_agrees_across_workers_dockerfile_and_prometheus():
    ports = {opt(w, "--metrics-port") for w in workers()}
    assert len(ports) == 1 and None not in ports, f"workers must all pass one --metrics-port, got {ports}"
    port = int(ports.pop())
    assert str(port) in [str(p) for p in services()["worker"].get("expose", [])]
    dockerfile = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.findall(r"^EXPOSE\s+(\d+)", dockerfile, re.MULTILINE) == [str(port)]
    health = re.search(r"^HEALTHCHECK\s.*", dockerfile, re.MULTILINE).group(0)
    assert f"127.0.0.1:{port}/healthz" in health
    assert re.search(r"^USER\s+(?!root\b|0\b)\S+", dockerfile, re.MULTILINE), "the image runs as root"
    assert "torch==2.13.0" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    prom = load_yaml((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = [j for j in prom["scrape_configs"]
            if any("worker" in sd["names"] and sd["port"] == port for sd in j.get("dns_sd_configs", []))]
    assert jobs, "no scrape job discovers the worker service on the metrics port"
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    mounts = dict(v.split(":")[:2] for v in services()["prometheus"]["volumes"] if v.startswith("."))
    assert mounts.get("./prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"


def test_grafana_provisioning_points_at_prometheus_and_mounted_dashboards():
    mounts = {h: c for h, c, *_ in (v.split(":") for v in services()["grafana"]["volumes"] if v.startswith("."))}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    prov = DOCKER / "grafana" / "provisioning"
    sources = [d for f in (prov / "datasources").glob("*.yml") for d in load_yaml(f.read_text())["datasources"]]
    host, port = re.fullmatch(r"https?://([^:/]+):(\d+)/?", sources[0]["url"]).groups()
    assert host == "prometheus" and int(port) in {int(p.split(":")[-1]) for p in services()["prometheus"]["ports"]}
    providers = [p for f in (prov / "dashboards").glob("*.yml") for p in load_yaml(f.read_text())["providers"]]
    host_dirs = {c: h for h, c in mounts.items()}
    dashboards = []
    for p in providers:
        assert p["options"]["path"] in host_dirs, "dashboard provider reads a folder nobody mounts"
        dashboards += sorted((DOCKER / host_dirs[p["options"]["path"]]).glob("*.json"))
    assert dashboards
    uids = {d.get("uid") for d in sources}
    for f in dashboards:
        for panel in json.loads(f.read_text())["panels"]:
            for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
                assert ds is None or ds["uid"] in uids, f"{panel['title']}: unknown data source {ds}"
    home = services()["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or any(home == f"{c}/{d.name}" for c in host_dirs for d in dashboards)


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (no functions, labels, durations or grouping labels)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    words = [m for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s) if not s[m.end():].lstrip().startswith("(")]
    return {m.group(0) for m in words} - {"and", "or", "unless", "bool", "offset"}


def test_dashboard_queries_only_agreed_metric_names():
    assert promql_metrics('sum by (kind) (increase(streamtta_alerts_total{kind="x"}[5m])) / on(job) up') == \
        {"streamtta_alerts_total", "up"}
    exprs = [t["expr"] for f in (DOCKER / "grafana" / "dashboards").glob("*.json")
             for p in json.loads(f.read_text())["panels"] for t in p.get("targets", [])]
    used = set().union(*map(promql_metrics, exprs))
    stray = {m for m in used if m not in AGREED and not m.startswith("process_") and m != "up"}
    assert not stray, f"dashboard queries metrics nobody exports: {stray}"
    required = {"streamtta_records_total", "streamtta_consumer_lag", "streamtta_step_seconds_bucket",
                "streamtta_batch_seconds_bucket", "streamtta_ood_ratio", "streamtta_alerts_total",
                "streamtta_states", "process_resident_memory_bytes"}
    assert required <= used, f"panels missing for {required - used}"
    for h in ("step", "batch"):
        for q in ("0.5", "0.99"):
            assert any(re.search(rf"histogram_quantile\({q},.*streamtta_{h}_seconds_bucket", e) for e in exprs)
    prom = load_yaml((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert set(re.findall(r'job="([^"]+)"', " ".join(exprs))) <= jobs, "dashboard filters on a job nobody scrapes"


def test_readme_documents_the_published_ports():
    readme = (DOCKER / "README.md").read_text()
    published = {str(p).split(":")[0] for s in services().values() for p in s.get("ports", [])}
    assert published >= {"3000", "9090", "29092"}
    assert all(p in readme for p in published), f"ports not in docker/README.md: {published}"


def test_readme_commands_that_join_the_workers_group_keep_its_state_store_and_model():
    """A process that joins the workers' group takes partitions over from them: with another state store it
    would not find their adapted states (they are in the changelog), with another model it could not use them."""
    from streamtta.config.models import KafkaConfig

    readme = (DOCKER / "README.md").read_text().replace("\\\n", " ")
    runs = [shlex.split(line.split("#")[0]) for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
            for line in block.splitlines() if line.strip().startswith("streamtta run")]
    w = workers()[0]
    joining = [r for r in runs if (opt(r, "--topic") or KafkaConfig().topic) == opt(w, "--topic")
               and opt(r, "--group-id") == opt(w, "--group-id")]
    assert joining, "docker/README.md shows no command that joins the workers' group"
    for r in joining:
        assert opt(r, "--state-store") == opt(w, "--state-store"), f"{' '.join(r)}: not the workers' state store"
        assert opt(r, "--model") == opt(w, "--model"), f"{' '.join(r)}: not the workers' model"


def test_readme_compose_commands_name_the_compose_file():
    """The commands are run from the repository root, where no compose file is found without ``-f``."""
    text = " ".join((DOCKER / "README.md").read_text().replace("\\\n", " ").split())
    calls = re.findall(r"docker compose\b[^`\n]*", text)
    assert calls and all(c.startswith("docker compose -f docker/docker-compose.yml ") for c in calls), \
        [c for c in calls if not c.startswith("docker compose -f docker/docker-compose.yml ")]
