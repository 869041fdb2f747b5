"""`statefuld`: serve, and the operator commands that talk to a running daemon."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from statefuld import __version__
from statefuld.config import Config, option_envvars, option_fields, unknown_envvar
from statefuld.errors import EXIT_CONFIG, EXIT_USAGE
from statefuld_client._paths import SOCKET_ENVS


class OctalInt(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    name = "octal"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            mode = int(str(value), 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            self.fail(f"{value!r} is not an octal file mode such as 0660", param, ctx)
        if mode & 0o600 != 0o600:
            self.fail(f"{value!r} would keep the socket's own user from connecting; it needs at least 0600",
                      param, ctx)
        return mode

    def fail(self, message: str, param: click.Parameter | None = None, ctx: click.Context | None = None) -> NoReturn:
        # Name where the value came from (the option or its environment variable), not both.
        source = ctx.get_parameter_source(param.name) if ctx is not None and param is not None and param.name else None
        if param is not None and source is click.core.ParameterSource.ENVIRONMENT and param.envvar:
            where = param.envvar if isinstance(param.envvar, str) else param.envvar[0]
        elif isinstance(param, click.Option):
            where = param.opts[0]
        else:
            where = "value"
        raise click.UsageError(f"{where}: {message}", ctx)


def _click_type(annotation: Any, settings: dict[str, Any]) -> Any:
    kind = settings.get("type")
    if kind == "octal":
        return OctalInt()
    if isinstance(kind, tuple):
        return click.Choice(kind, case_sensitive=False)
    base = next((a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis), annotation)
    bounded = "min" in settings or "max" in settings
    if base is int:
        return click.IntRange(min=settings.get("min"), max=settings.get("max")) if bounded else click.INT
    if base is float:
        return click.FloatRange(min=settings.get("min"), max=settings.get("max")) if bounded else click.FLOAT
    return click.STRING


def _shown_default(default: Any, settings: dict[str, Any]) -> str | bool:
    if default in (None, ()):
        return False
    if settings.get("type") == "octal":
        return f"0{default:o}"
    return True


def config_options(command: Callable[..., Any], only: Sequence[str] | None = None) -> Callable[..., Any]:
    """Add one option per Config field (those named in ``only``, if given): --field-name, env
    STATEFULD_FIELD_NAME."""
    hints = typing.get_type_hints(Config)
    for f in reversed([f for f in option_fields() if only is None or f.name in only]):
        settings = dict(f.metadata["click"])
        has_default = f.default is not dataclasses.MISSING
        command = click.option(
            "--" + f.name.replace("_", "-"),
            f.name,
            type=_click_type(hints[f.name], settings),
            multiple=bool(settings.get("multiple")),
            default=f.default if has_default else None,
            show_default=_shown_default(f.default, settings) if has_default else False,
            envvar=option_envvars(f),
            show_envvar=True,
            help=f.metadata["help"],
        )(command)
    return command


class _ServeUsageError(click.UsageError):
    exit_code = EXIT_USAGE


class _ServeCommand(click.Command):
    """`serve` exits EXIT_USAGE (not click's 2) on a bad option or STATEFULD_* value.

    systemd's RestartPreventExitStatus= lists the daemon's own start-up codes; with click's 2 a
    typo in the environment file would restart-loop the service instead of failing it once.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:  # BadParameter, NoSuchOption, MissingParameter, ...
            # The same message and usage hint on stderr; only the exit code differs.
            raise _ServeUsageError(exc.format_message(), exc.ctx) from exc


@click.group()
@click.version_option(__version__, prog_name="statefuld")
def main() -> None:
    """statefuld: the sidecar that routes each user of a stateful service to its pod."""


@main.command(cls=_ServeCommand)
@config_options
def serve(**options: Any) -> None:
    """Run the daemon (with no --redis-url: an embedded private Redis)."""
    from statefuld import server  # the client commands need none of the server's imports
    from statefuld.logs import configure_logging

    unknown = unknown_envvar(dict(os.environ))
    if unknown is not None:
        click.echo(f"statefuld: {unknown}", err=True)
        sys.exit(EXIT_USAGE)
    config = _config_or_exit({name: value for name, value in options.items() if value is not None}, "statefuld")
    configure_logging(config.log_level, config.log_format)
    sys.exit(server.run(config))


def _config_or_exit(given: dict[str, Any], who: str) -> Config:
    """The configuration the options give, with the password read; else exit with a one-line reason."""
    try:
        return Config(**given).with_secrets_from_environment()
    except ValueError as exc:
        click.echo(f"{who}: invalid configuration: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as exc:
        click.echo(f"{who}: cannot read the Redis password file: {exc.strerror}", err=True)
        sys.exit(EXIT_CONFIG)


def _client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--timeout-s", type=click.FloatRange(min=0.001), default=5.0, show_default=True,
        help="Give up after this many seconds.",
    )(command)
    return click.option(
        "--socket-path", envvar=list(SOCKET_ENVS), show_envvar=True, default=None,
        help="The daemon's socket (default: as the daemon resolves it).",
    )(command)


def _run_client(socket_path: str | None, timeout_s: float, method: str, params: list[Any]) -> Any:
    from statefuld_client import Client, InvalidArgumentError, StatefuldError

    try:
        with Client(socket_path=socket_path, timeout_s=timeout_s) as client:
            return client.call(method, *params)
    except StatefuldError as exc:
        hint = ""
        if isinstance(exc, InvalidArgumentError) and re.search(_NOT_A_STRING, exc.message):
            hint = " (arguments are read as JSON: quote a string of digits, true or null, as '\"12345\"')"
        click.echo(f"statefuld: {method}: {exc}{hint}", err=True)
        sys.exit(1)


# What a JSON-looking argument meant as a string turns into: say how to quote it.
_NOT_A_STRING = r"must be a string, got (int|float|bool|nil)"


def method_list() -> str:
    """Every method with its parameters, one a line, as `statefuld methods` prints them."""
    from statefuld.rpc import METHODS  # loads the daemon's modules: only when asked

    return "\n".join(f"{name} {' '.join(method.params)}".rstrip() for name, method in METHODS.items())


class _CallCommand(click.Command):
    """`call --help` ends with the methods and their parameters."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        with formatter.section("Methods (docs/PROTOCOL.md says what each answers)"):
            formatter.write_text("\b\n" + method_list())


@main.command()
@_client_options
def ping(socket_path: str | None, timeout_s: float) -> None:
    """Check that the daemon answers (liveness); exit 0 if it does."""
    click.echo(_run_client(socket_path, timeout_s, "ping", []))


@main.command()
@_client_options
def health(socket_path: str | None, timeout_s: float) -> None:
    """Print the daemon's health; exit 0 only when it is ready (readiness probe)."""
    result = _run_client(socket_path, timeout_s, "health", [])
    click.echo(json.dumps(result, sort_keys=True))
    sys.exit(0 if isinstance(result, dict) and result.get("ready") is True else 1)


def _parse_arg(text: str) -> Any:
    # JSON first (numbers, lists, null); anything that is not JSON is taken as a plain string,
    # so `statefuld call get_linked_pod game alice lobby` needs no quoting.
    try:
        return json.loads(text)
    except ValueError:
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@main.command()
def methods() -> None:
    """List the daemon's methods and their parameters, in the order `call` takes them."""
    click.echo(method_list())


@main.command(cls=_CallCommand, context_settings={"ignore_unknown_options": True})
@_client_options
@click.argument("method")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def call(socket_path: str | None, timeout_s: float, method: str, args: tuple[str, ...]) -> None:
    """Call METHOD with ARGS (each parsed as JSON, else taken as a string); print the result as JSON.

    \b
    Example: statefuld call set_linked_pod game alice lobby 3 -1
             statefuld call get_linked_pod game '"12345"' lobby   (a uid of digits, quoted as JSON)
    """
    result = _run_client(socket_path, timeout_s, method, [_parse_arg(a) for a in args])
    click.echo(json.dumps(_jsonable(result), sort_keys=True))


@main.command()
@_client_options
@click.option("--links", is_flag=True, help="Watch the service's links instead of its pods and workload.")
@click.option("--json", "as_json", is_flag=True, help="Each event as one line of JSON.")
@click.argument("ns")
@click.argument("service")
def watch(socket_path: str | None, timeout_s: float, links: bool, as_json: bool, ns: str, service: str) -> None:
    """Print NS/SERVICE's changes as they happen, one line each, until Ctrl-C: pod states and the
    workload state (first the current ones, as a snapshot), or with --links every link."""
    from statefuld_client import Client, StatefuldError

    try:
        with Client(socket_path=socket_path, timeout_s=timeout_s) as client, \
                (client.watch_links(ns, service) if links else client.watch_service(ns, service)) as events:
            for event in events:
                click.echo(json.dumps(_jsonable(event), sort_keys=True) if as_json else _event_line(event))
    except KeyboardInterrupt:
        return
    except StatefuldError as exc:
        click.echo(f"statefuld: watch: {exc}", err=True)
        sys.exit(1)


def _event_line(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S")
    kind = event.get("kind")
    if kind == "pod":
        return f"{stamp} pod {event['pod_id']} {event['state'] if event['state'] is not None else '(removed)'}"
    if kind == "workload":
        return f"{stamp} workload {event['state'] if event['state'] is not None else '(none)'}"
    if kind == "link":
        if event["cause"] == "set":
            persistence = "persistent" if event["persistent"] else "temporary"
            return f"{stamp} link {event['uid']} -> pod {event['pod_id']} ({persistence})"
        return f"{stamp} link {event['uid']} {event['cause']}"
    if kind == "snapshot":
        pods = " ".join(f"{pod}={state}" for pod, state in sorted(event["states"].items())) or "(no pods)"
        return f"{stamp} snapshot: {pods}; workload {event['workload'] if event['workload'] is not None else '(none)'}"
    return f"{stamp} gap: events may have been missed; re-read what you need"


# What `audit` shares with `serve`: how to reach Redis, and how pods are judged.
_AUDIT_FIELDS = ("redis_url", "redis_mode", "redis_username", "redis_password_file", "redis_tls_ca_file",
                 "redis_tls_cert_file", "redis_tls_key_file", "key_prefix", "routable_state", "load_stale_ms",
                 "gone_state", "gone_after_ms")


def _audit_config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    return config_options(command, _AUDIT_FIELDS)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--examples", type=click.IntRange(min=0), default=5, show_default=True,
              help="Examples shown for each kind of finding.")
@click.option("--max-keys-per-s", type=click.FloatRange(min=1), default=20_000, show_default=True,
              help="Keys read per second at most, on average (keeps a production Redis responsive).")
@click.option("--scan-count", type=click.IntRange(min=1, max=10_000), default=500, show_default=True,
              help="COUNT of each SCAN: keys read per round trip, roughly.")
@click.option("--progress-s", type=click.FloatRange(min=0.01), default=5.0, show_default=True,
              help="Seconds between progress lines on stderr.")
@_audit_config_options
def audit(as_json: bool, examples: int, max_keys_per_s: float, scan_count: int, progress_s: float,
          **options: Any) -> None:
    """Read a live Redis (read-only, SCAN, paced) and report the data statefuld would read
    differently from the in-process executors, or refuse to touch (docs/MIGRATION.md).

    Exit 0 when nothing was found, 1 when something was, 64 on bad options, 69 when Redis
    cannot be reached.
    """
    import asyncio

    from statefuld.audit import report_table, run_audit
    from statefuld.errors import EXIT_REDIS_UNAVAILABLE, Unavailable
    from statefuld.redis_mux import ReplyError
    from statefuld.server import redact_url

    given = {name: value for name, value in options.items() if value is not None}
    if not given.get("redis_url"):
        click.echo("statefuld: audit: name the Redis to read with --redis-url (or STATEFULD_REDIS_URL)", err=True)
        sys.exit(EXIT_USAGE)
    config = _config_or_exit(given, "statefuld: audit")
    where = redact_url(config.redis_url or "")
    try:
        report = asyncio.run(run_audit(config, examples=examples, max_keys_per_s=max_keys_per_s,
                                       scan_count=scan_count, progress=lambda line: click.echo(line, err=True),
                                       progress_s=progress_s))
    except (Unavailable, ReplyError, OSError, ValueError) as exc:
        click.echo(f"statefuld: audit: cannot read {where}: {exc}", err=True)
        sys.exit(EXIT_REDIS_UNAVAILABLE)
    click.echo(json.dumps(report.as_json(), sort_keys=True) if as_json else report_table(report, where))
    sys.exit(1 if report.found else 0)


@main.command()
@_client_options
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of the table.")
@click.argument("ns")
@click.argument("service")
def pods(socket_path: str | None, timeout_s: float, as_json: bool, ns: str, service: str) -> None:
    """Print the pods of NS/SERVICE as route_user judges them now: eligible (gets new users),
    alive (keeps its users, gets none) or gone (its users move at their next route_user), and why.
    """
    described = _run_client(socket_path, timeout_s, "describe_pods", [ns, service])
    if as_json:
        click.echo(json.dumps(described, sort_keys=True))
        return
    rows = [("POD", "STATE", "LOAD", "REPORT AGE", "STATUS", "WHY")]
    for pod in described:
        age = pod["report_age_ms"]
        rows.append((str(pod["pod_id"]), "-" if pod["state"] is None else str(pod["state"]),
                     "-" if pod["load"] is None else str(pod["load"]),
                     "-" if age is None else _duration(age / 1000), pod["status"], pod["why"]))
    if len(rows) == 1:
        rows.append(("(no pods)", "", "", "", "", ""))
    click.echo("\n".join(_aligned(rows)))


@main.command()
@_client_options
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C; rates over each interval.")
@click.option("--interval-s", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
def stats(socket_path: str | None, timeout_s: float, watch: bool, interval_s: float) -> None:
    """Print per-method rate, p50/p99 latency and errors, and the daemon's gauges.

    \b
    Without --watch: one table, rates averaged since the daemon started.
    With --watch: redrawn every --interval-s, rates and quantiles over the last interval.
    The raw numbers: `statefuld call stats` (JSON), or the Prometheus listener (--metrics-addr).
    """
    from statefuld_client import Client, StatefuldError

    redraw = sys.stdout.isatty()
    try:
        with Client(socket_path=socket_path, timeout_s=timeout_s) as client:
            if not watch:
                click.echo(stats_table(_get_stats(client, StatefuldError)))
                return
            previous: dict[str, Any] | None = None
            taken_at = 0.0
            while True:
                try:
                    snap = _get_stats(client, StatefuldError)
                except StatefuldError as exc:  # e.g. the daemon restarting: say so, keep watching
                    text, previous = f"statefuld: stats: {exc}", None
                else:
                    now = time.monotonic()
                    if previous is not None and snap["uptime_s"] < previous["uptime_s"]:
                        previous = None  # the daemon restarted: its counters started again
                    text = stats_table(snap, previous, now - taken_at if previous is not None else None)
                    previous, taken_at = snap, now
                # Home and clear-to-end on a terminal; plain successive tables into a pipe or file.
                click.echo("\x1b[H\x1b[2J" + text if redraw else text + "\n")
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return
    except StatefuldError as exc:
        click.echo(f"statefuld: stats: {exc}", err=True)
        sys.exit(1)


def _get_stats(client: Any, error: type[Exception]) -> dict[str, Any]:
    result = client.call("stats")
    if not isinstance(result, dict):
        raise error(f"unexpected stats result: {result!r}")
    return result


# --- the stats table ------------------------------------------------------------------------


def stats_table(snap: dict[str, Any], previous: dict[str, Any] | None = None, interval_s: float | None = None) -> str:
    """The `statefuld stats` table. With a previous snapshot: rates, quantiles and errors over the
    interval between the two; else averages since the daemon started."""
    from statefuld.metrics import BOUNDS_S, quantile_ms  # the probes' commands need none of it

    uptime_s = max(float(snap.get("uptime_s", 0.0)), 1e-9)
    if previous is None:
        since, seconds, span = None, uptime_s, "since start"
    else:
        since, seconds = previous.get("methods", {}), interval_s or 0.0
        span = "last " + _duration(interval_s) if interval_s else "since start"
    bounds_s = [b / 1000 for b in snap.get("latency_bounds_ms", [b * 1000 for b in BOUNDS_S])]
    rows = [("METHOD", "COUNT", f"RATE/S ({span})", "P50", "P99", "ERRORS")]
    for name, m in sorted(snap.get("methods", {}).items()):
        count, buckets, errors = _method_since(m, None if since is None else since.get(name, {}))
        rows.append((
            name, str(count), f"{count / seconds if seconds else 0.0:.1f}",
            _ms(quantile_ms(buckets, 0.50, bounds_s)), _ms(quantile_ms(buckets, 0.99, bounds_s)),
            ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "0",
        ))
    if len(rows) == 1:
        rows.append(("(no calls yet)", "", "", "", "", ""))
    return "\n".join(_stats_header(snap, previous, uptime_s) + _aligned(rows))


def _aligned(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """The first column left-aligned, the numbers right-aligned, the last column as it is."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


def _stats_header(snap: dict[str, Any], previous: dict[str, Any] | None, uptime_s: float) -> list[str]:
    redis = snap.get("redis", {})
    counters = snap.get("counters", {})
    liveness = snap.get("liveness", {})
    writes = int(redis.get("writes", 0))
    commands = int(redis.get("commands", 0))
    if previous is not None:
        writes -= int(previous.get("redis", {}).get("writes", 0))
        commands -= int(previous.get("redis", {}).get("commands", 0))
    batch = f"{commands / writes:.1f}" if writes > 0 else "-"
    return [
        f"statefuld {snap.get('version', '?')}  up {_duration(uptime_s)}  "
        f"redis {'up' if redis.get('up') else 'DOWN'}  connections {snap.get('connections', 0)}  "
        f"in flight {snap.get('in_flight', 0)}",
        f"shed {counters.get('overloaded', 0)}  timeouts {counters.get('timeouts', 0)}  "
        f"failed notifications {counters.get('notification_failures', 0)}  "
        f"script reloads {redis.get('script_reloads', 0)}  redis commands/write {batch}",
        f"held pods {liveness.get('held_pods', 0)}  heartbeat failures {liveness.get('heartbeat_failures', 0)}  "
        f"downs written {liveness.get('downs_written', 0)}  routes "
        + (" ".join(f"{k} {n}" for k, n in liveness.get("routes", {}).items()) or "-"),
    ]


def _method_since(m: dict[str, Any], before: dict[str, Any] | None) -> tuple[int, list[int], dict[str, int]]:
    """One method's count, latency buckets and errors; with ``before``, only what came since it."""
    count, buckets, errors = int(m["count"]), list(m["latency_buckets"]), dict(m["errors"])
    if before is None:
        return count, buckets, errors
    buckets = [a - b for a, b in zip(buckets, before.get("latency_buckets", [0] * len(buckets)), strict=True)]
    errors = {code: n - int(before.get("errors", {}).get(code, 0)) for code, n in errors.items()}
    return count - int(before.get("count", 0)), buckets, {code: n for code, n in errors.items() if n}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}us"
    return f"{value:.2f}ms" if value < 100 else f"{value:.0f}ms"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
