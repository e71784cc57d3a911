"""Settings: read once from ``RPC_SERVER_*`` environment variables into a frozen object.

The start of the flow: the CLI calls ``Settings.from_env()`` once and hands the object on
(the app keeps it under ``app.SETTINGS``); nothing reads the environment again.

Each variable is read by the parser of its field's type (``PARSERS``): a marshmallow field,
so a bad value is refused naming the variable and what it expected, and a field of a type no
parser handles stops this module's import. A variable with the prefix that no field reads is
not an error (a deployment may set it for a newer version), but ``unknown_variables`` names
it, with the setting it is probably a typo of, for the CLI to warn about.

Why marshmallow's fields and not environs (which STYLE.md names): environs reads
``os.environ`` and .env files only, while ``from_env`` reads the mapping it is given (every
test builds its own settings so); environs 15.2 has no public way to read another mapping
(the hook its own ``FileAwareEnv`` overrides, ``Env._get_value``, is private and appeared in
14.3). environs' parsers are these same marshmallow fields, so they are used directly.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError
from marshmallow import fields as marshmallow_fields

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./rpc_server.sqlite3"
PREFIX = "RPC_SERVER_"
# Variables with the prefix that are not settings: the test suite's own.
NOT_SETTINGS = frozenset({"RPC_SERVER_TEST_DATABASE_URL", "RPC_SERVER_SOAK_SECONDS"})


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, its default, and the environment variable it comes from.

    The variable of a field is ``RPC_SERVER_`` + its upper-cased name, for example
    ``database_url`` comes from ``RPC_SERVER_DATABASE_URL``.
    """

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 8080
    # The base URL clients reach this server at (scheme, host, port and any path prefix a
    # proxy adds), for example https://api.shop.example; the OpenRPC document's server is
    # it + "/rpc". None: http://<host>:<port>, the address served.
    public_url: str | None = None
    frontend_url: str = "http://localhost:3000"
    log_level: str = "INFO"
    # One line per HTTP request (logger "aiohttp.access", at INFO); off when a proxy in
    # front already logs requests.
    access_log: bool = True
    workers: int = 1
    shutdown_timeout: float = 30.0
    # Connection pool, per process.
    db_pool_size: int = 10
    # Connections beyond the pool are opened for a burst and closed when given back (on
    # PostgreSQL: after 5 idle minutes, asyncpg's pool); under steady load that churn (a
    # connect, and on SQLite a thread, per call) cost more than waiting for a pooled
    # connection (measured: tests/benchmarks/profile.md). 0: none.
    db_max_overflow: int = 0
    db_pool_timeout: float = 10.0
    db_connect_timeout: float = 5.0
    # PostgreSQL: ping every connection at checkout (a round trip per unit of work).
    # Off, a connection the server has closed is still replaced at checkout, for free.
    db_pre_ping: bool = False
    # Envelope limits: every client request is bounded before any work is done.
    max_body_bytes: int = 1024 * 1024
    max_batch_length: int = 100
    max_json_depth: int = 64
    call_timeout: float = 30.0
    # How long a buyer token's successful lookup is trusted (its revocation takes effect
    # within it); staff and payments tokens are looked up on every request.
    token_cache_seconds: float = 5.0
    # How long new tokens live, in days (RPC_SERVER_TOKEN_TTL=never: they do not expire);
    # create-token --expires-in overrides it.
    token_ttl: float | None = 90.0
    # Per-user rate limit (a valid token's calls): calls per second refilling a bucket of
    # rate_burst; 0 = off.
    rate_limit: float = 50.0
    rate_burst: int = 500
    # Calls without a valid token (none, unknown, expired), limited per client address.
    anonymous_rate_limit: float = 10.0
    anonymous_rate_burst: int = 100
    # Proxies (addresses or networks) whose X-Forwarded-For names the client; none.
    trusted_proxies: tuple[str, ...] = ()
    # Slow and idle clients: headers and body must arrive within read_timeout; an idle
    # keep-alive connection is closed after keepalive_timeout; a batch as a whole may run
    # batch_timeout; past max_connections open connections a process refuses new ones.
    read_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    batch_timeout: float = 60.0
    max_connections: int = 1000
    # Open (pending) purchases one user may hold at once.
    max_pending_purchases: int = 50
    # Log lines as text (one line, fields escaped) or as JSON objects.
    log_format: str = "text"
    # Browser origins allowed to call the API (CORS): exact origins as browsers send them
    # (scheme://host[:port]), or "*" alone for any origin (never "null"); none by default.
    cors_origins: tuple[str, ...] = ()
    # Receipt emails: SMTP when smtp_url is set, else .eml files in mail_dir.
    mail_from: str = "Course Shop <receipts@shop.example>"
    smtp_url: str | None = None
    mail_dir: str = "./mail"
    mail_in_serve: bool = True
    mail_max_attempts: int = 8
    mail_retry_base: float = 30.0
    mail_retry_cap: float = 3600.0
    mail_poll_interval: float = 5.0
    # A claimed receipt's lease, renewed every third of it while its send goes on: the
    # receipts of a deliverer that died are due again within this many seconds.
    mail_lease: float = 15.0
    # Receipts one deliverer sends at the same time (SMTP: connections kept open). 16:
    # at 8, SMTP sends (four round trips each through a busy event loop) fell 2-3 % behind
    # fulfils at saturation on SQLite; at 16 they kept up (tests/benchmarks/profile.md).
    mail_concurrency: int = 16
    # Signed payment events (Standard Webhooks): comma-separated whsec_ secrets, any of
    # which may sign (list the new one first while rotating; sign-payment uses the first).
    # None: no proof or webhook is ever accepted.
    payment_keys: tuple[str, ...] = ()
    # How far a payment event's timestamp may be from now, in either direction.
    payment_tolerance: float = 300.0
    # Let serve listen on a non-loopback address while demo tokens or the demo key live.
    allow_demo: bool = False
    # Live updates over a WebSocket on GET /rpc (rpc_server.live). Per process: open
    # WebSockets (they count towards max_connections too). Per connection: subscriptions,
    # messages queued for a slow reader before it is closed (1008), seconds between
    # pings, seconds to call rpc.authenticate without an Authorization header, seconds
    # between checks that its token still holds. A subscription's since may lie at most
    # ws_replay_window events before the latest; older, it gets purchase.resync.
    ws_max_connections: int = 1000
    ws_max_subscriptions: int = 16
    ws_send_queue: int = 256
    ws_heartbeat: float = 30.0
    ws_auth_timeout: float = 10.0
    ws_token_recheck: float = 30.0
    ws_replay_window: int = 10000
    # Prometheus metrics at GET /metrics (rpc_server.observability.metrics), readable from
    # this machine; a scraper elsewhere sends metrics_token as a bearer token.
    metrics: bool = True
    metrics_token: str | None = None
    # OpenTelemetry traces exported with OTLP (needs the otel extra; the exporter reads
    # OTEL_EXPORTER_OTLP_ENDPOINT and the other OTEL_* variables).
    tracing: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``), then ``overrides``.

        Raises ConfigError naming the variable when a value does not parse or is out of range.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {
            field.name: PARSERS[str(field.type)].read(variable, environ[variable])
            for field in fields(cls)
            if (variable := variable_for(field.name)) in environ
        }
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_body_bytes < 1:
            raise ConfigError("RPC_SERVER_MAX_BODY_BYTES must be at least 1")
        if self.max_batch_length < 1:
            raise ConfigError("RPC_SERVER_MAX_BATCH_LENGTH must be at least 1")
        if not 1 <= self.workers <= 64:
            raise ConfigError("RPC_SERVER_WORKERS must be between 1 and 64")
        if not self.shutdown_timeout > 0:
            raise ConfigError("RPC_SERVER_SHUTDOWN_TIMEOUT must be a positive number")
        if self.max_json_depth < 2:
            raise ConfigError("RPC_SERVER_MAX_JSON_DEPTH must be at least 2")
        if not 0 < self.call_timeout <= 3600:
            raise ConfigError("RPC_SERVER_CALL_TIMEOUT must be between 0 and 3600 seconds")
        if self.db_pool_size < 1 or self.db_max_overflow < 0:
            raise ConfigError("RPC_SERVER_DB_POOL_SIZE must be >= 1 and MAX_OVERFLOW >= 0")
        if not (self.db_pool_timeout > 0 and self.db_connect_timeout > 0):
            raise ConfigError("RPC_SERVER_DB_POOL_TIMEOUT and DB_CONNECT_TIMEOUT must be > 0")
        if not 0 <= self.token_cache_seconds <= 300:
            raise ConfigError("RPC_SERVER_TOKEN_CACHE_SECONDS must be between 0 and 300")
        if self.rate_limit < 0 or (self.rate_limit > 0 and self.rate_burst < 1):
            raise ConfigError("RPC_SERVER_RATE_LIMIT must be >= 0 and RATE_BURST >= 1")
        if self.anonymous_rate_limit < 0 or (
            self.anonymous_rate_limit > 0 and self.anonymous_rate_burst < 1
        ):
            raise ConfigError(
                "RPC_SERVER_ANONYMOUS_RATE_LIMIT must be >= 0 and ANONYMOUS_RATE_BURST >= 1"
            )
        if self.token_ttl is not None and not 0 < self.token_ttl <= 36500:
            raise ConfigError("RPC_SERVER_TOKEN_TTL must be days between 0 and 36500, or never")
        for name in ("read_timeout", "keepalive_timeout", "batch_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"RPC_SERVER_{name.upper()} must be between 0 and 3600 seconds")
        if self.max_connections < 1:
            raise ConfigError("RPC_SERVER_MAX_CONNECTIONS must be at least 1")
        if self.max_pending_purchases < 1:
            raise ConfigError("RPC_SERVER_MAX_PENDING_PURCHASES must be at least 1")
        if self.log_format not in ("text", "json"):
            raise ConfigError("RPC_SERVER_LOG_FORMAT must be text or json")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"RPC_SERVER_TRUSTED_PROXIES: {proxy!r} is not an address or network"
                ) from None
        if self.mail_max_attempts < 1:
            raise ConfigError("RPC_SERVER_MAIL_MAX_ATTEMPTS must be at least 1")
        if self.mail_concurrency < 1:
            raise ConfigError("RPC_SERVER_MAIL_CONCURRENCY must be at least 1")
        for name in ("mail_retry_base", "mail_retry_cap", "mail_poll_interval", "mail_lease"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RPC_SERVER_{name.upper()} must be a positive number")
        if self.smtp_url:
            from rpc_server.mail.mailer import SmtpMailer  # the URL's one parser

            try:
                SmtpMailer.from_url(self.smtp_url)
            except ValueError as exc:
                # The parser's own messages name the variable; urllib's (a port that is
                # not a number) do not.
                message = str(exc)
                if not message.startswith("RPC_SERVER_SMTP_URL"):
                    message = f"RPC_SERVER_SMTP_URL: {message}"
                raise ConfigError(message) from None
        if not 0 < self.payment_tolerance <= 86400:
            raise ConfigError("RPC_SERVER_PAYMENT_TOLERANCE must be between 0 and 86400 seconds")
        from rpc_server.payment_signatures import parse_secret  # the keys' one parser

        for number, secret in enumerate(self.payment_keys, start=1):
            try:
                parse_secret(secret)
            except ValueError as exc:  # never echo the secret itself
                raise ConfigError(f"RPC_SERVER_PAYMENT_KEYS, key {number}: {exc}") from None
        for name in ("ws_max_connections", "ws_max_subscriptions", "ws_send_queue",
                     "ws_replay_window"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"RPC_SERVER_{name.upper()} must be at least 1")
        for name in ("ws_heartbeat", "ws_auth_timeout", "ws_token_recheck"):
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"RPC_SERVER_{name.upper()} must be between 0 and 3600 seconds")
        if self.tracing and not _tracing_installed():
            raise ConfigError(
                "RPC_SERVER_TRACING is on but OpenTelemetry is not installed: "
                "pip install 'rpc-server[otel]'"
            )
        if self.metrics_token is not None and len(self.metrics_token) < 16:
            raise ConfigError("RPC_SERVER_METRICS_TOKEN must be at least 16 characters")
        if not 0 < self.port < 65536:
            raise ConfigError("RPC_SERVER_PORT must be between 1 and 65535")
        if self.public_url is not None:
            _check_public_url(self.public_url)
        from rpc_server.http.cors import origins_problem  # the origins' one checker

        if (problem := origins_problem(self.cors_origins)) is not None:
            raise ConfigError(f"RPC_SERVER_CORS_ORIGINS: {problem}")

    def rpc_url(self) -> str:
        """The endpoint's absolute URL, as clients call it (the OpenRPC document's server)."""
        if self.public_url:
            return f"{self.public_url.rstrip('/')}/rpc"
        # A wildcard address is served on every interface, this machine's loopback too.
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:  # an IPv6 address is bracketed in a URL
            host = f"[{host}]"
        return f"http://{host}:{self.port}/rpc"


def _check_public_url(url: str) -> None:
    problem = "RPC_SERVER_PUBLIC_URL must be an absolute http:// or https:// URL"
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced [ or ]
        raise ConfigError(problem) from None
    if parts.username is not None or parts.password is not None:  # never echo a password
        raise ConfigError(f"{problem} with no user or password in it")
    try:
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"{problem}, got {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{problem}, got {url!r}")
    if parts.query or parts.fragment or any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(
            f"{problem} with no query, fragment or spaces, such as https://api.shop.example, "
            f"got {url!r}"
        )


def variable_for(field_name: str) -> str:
    """The environment variable a setting comes from: ``port`` -> ``RPC_SERVER_PORT``."""
    return f"{PREFIX}{field_name.upper()}"


@dataclass(frozen=True, slots=True)
class Parser:
    """How a setting of one type is read from its variable's text."""

    field: marshmallow_fields.Field[Any]
    # What a refusal says the variable must be: "RPC_SERVER_PORT must be an integer".
    expected: str

    def read(self, variable: str, raw: str) -> Any:
        """The value ``raw`` stands for; raises ConfigError naming ``variable``.

        The refusal quotes ``raw``: only numbers and true/false can be refused here, while
        secrets (payment keys, a password in a URL) are text or lists, which always parse,
        and are checked in ``validate`` without being echoed.
        """
        try:
            return self.field.deserialize(raw)
        except ValidationError:
            raise ConfigError(f"{variable} must be {self.expected}, got {raw!r}") from None


# Refuses nan and infinity (which no setting means) as well as what is not a number.
_NUMBER = marshmallow_fields.Float()
_YES_OR_NO = marshmallow_fields.Boolean(
    truthy={"1", "true", "yes", "on"}, falsy={"0", "false", "no", "off"}
)


def _boolean(raw: str) -> bool:
    return _YES_OR_NO.deserialize(raw.strip().lower())  # " TRUE" and "On" count too


def _number_or_never(raw: str) -> float | None:
    if raw.strip().lower() == "never":  # RPC_SERVER_TOKEN_TTL=never: no expiry
        return None
    return _NUMBER.deserialize(raw)


def _optional_text(raw: str) -> str | None:
    return raw or None  # set but empty (RPC_SERVER_SMTP_URL=) reads as unset


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


# The parser of each field type, by the annotation as written in Settings. Text is taken
# as it is: no stripping, no ${VAR} expansion.
PARSERS: Mapping[str, Parser] = {
    "str": Parser(marshmallow_fields.String(), "text"),
    "str | None": Parser(marshmallow_fields.Function(deserialize=_optional_text), "text"),
    "int": Parser(marshmallow_fields.Integer(), "an integer"),
    "float": Parser(_NUMBER, "a number"),
    "float | None": Parser(
        marshmallow_fields.Function(deserialize=_number_or_never), "a number or never"
    ),
    "bool": Parser(marshmallow_fields.Function(deserialize=_boolean), "true or false"),
    "tuple[str, ...]": Parser(
        marshmallow_fields.Function(deserialize=_comma_list), "a comma-separated list"
    ),
}


def require_parsers(settings_type: type[Any]) -> None:
    """Raise TypeError if a field of the dataclass ``settings_type`` has no parser.

    Run on ``Settings`` when this module is imported: a new setting of a new type must come
    with its parser, rather than reach the server as the variable's raw text.
    """
    missing = [f"{f.name}: {f.type}" for f in fields(settings_type) if f.type not in PARSERS]
    if missing:
        raise TypeError(f"settings with no parser in config.PARSERS: {', '.join(missing)}")


require_parsers(Settings)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """Each ``RPC_SERVER_*`` variable no setting reads, with the setting it is closest to.

    For example ``["RPC_SERVER_DATABSE_URL (did you mean RPC_SERVER_DATABASE_URL?)"]``,
    sorted; names are compared case-insensitively. ``environ`` defaults to ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    # Compared without the prefix, which every name shares and would make all look alike.
    settings = {f.name.upper(): variable_for(f.name) for f in fields(Settings)}
    known = NOT_SETTINGS.union(settings.values())
    notes = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or name in known:
            continue
        closest = difflib.get_close_matches(upper.removeprefix(PREFIX), settings, n=1)
        notes.append(f"{name} (did you mean {settings[closest[0]]}?)" if closest else name)
    return notes


def _tracing_installed() -> bool:
    """Whether the ``otel`` extra (OpenTelemetry's SDK and OTLP exporter) is installed."""
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
    )
