#!/usr/bin/env python3
"""hall.py -- the local Hall: worker registry, WCP router and decision log.

One file, standard library only, CPython 3.8 or newer.

    python hall.py                      # serve on http://127.0.0.1:8765, data in ./hall.db
    python -m unittest -v test_hall     # run the tests

The Hall is an organization's local governance daemon. Workers (AI agents,
tools, services) enroll in its registry; before anything runs a worker it
asks ``POST /api/route`` whether the capability may run and on which worker;
the Hall answers from its rules, its registry and its policy, and appends
every decision to a log that the Hall Monitor reads.

Reading order of this file:

    1. Configuration      -- defaults, environment variables, flags
    2. Utilities          -- time stamps, hashes, JSON input checks
    3. Storage            -- SQLite schema, migrations, queries
    4. Rules and router   -- rules documents, the policy gate, the pure router
    5. The Hall           -- the application object (also the embedding API)
    6. HTTP layer         -- the one route table, handlers, OpenAPI, server
    7. Command line       -- argparse, ``main()``

Embedding::

    import hall
    h = hall.Hall(":memory:")
    h.enroll(record)                    # same checks and answers as POST /enroll
    decision = h.route({"capability_id": "cap.doc.summarize", "env": "dev",
                        "data_label": "PUBLIC", "tenant_id": "acme"})
    server = h.serve(port=0)            # HTTP in a background thread
    print(server.url); server.stop(); h.close()

Importing this module has no side effects: no socket, file or thread.
"""

import argparse
import array
import base64
import bisect
import collections
import contextlib
import datetime
import errno
import functools
import hashlib
import heapq
import hmac
import io
import ipaddress
import json
import math
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import socket
import socketserver
import sqlite3
import struct
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import namedtuple
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

__version__ = "0.3.0"
HALL_NAME = "PyHall"


###############################################################################
# 1. Configuration
###############################################################################

# Vocabularies of the route input (the union of the reference documents).
ENVS = ("dev", "stage", "staging", "prod", "edge")
ENV_ALIASES = {"staging": "stage"}          # names that match as another env
DATA_LABELS = ("PUBLIC", "INTERNAL", "CONFIDENTIAL", "RESTRICTED", "SECRET")
TENANT_RISKS = ("low", "medium", "high")
QOS_CLASSES = ("P0", "P1", "P2", "P3")
HIGH_STAKES_ENVS = ("prod", "edge")

SCOPES = ("read", "route", "write", "rules", "admin")
ALL_SCOPES = frozenset(SCOPES)

DEFAULT_PORT = 8765
DEFAULT_MAX_BODY = 1024 * 1024              # bytes; larger bodies get 413
MAX_JSON_DEPTH = 64                         # deeper documents get 400
SESSION_COOKIE = "pyhall_session"


class ConfigError(Exception):
    """A setting that stops start-up: printed as one line, exit code 2."""


class Config(object):
    """Every setting of a hall, with its default.

    ``Config.load(argv, environ)`` reads flags and HALL_* variables (flags
    win); ``Config(db_path=...)`` builds one directly for embedding."""

    FIELDS = {
        # name:        (default, environment variable)
        "host":         ("127.0.0.1", "HALL_API_HOST"),
        "port":         (DEFAULT_PORT, "HALL_API_PORT"),
        "db_path":      ("hall.db", "HALL_DB_PATH"),
        "token":        (None, "HALL_TOKEN"),
        "token_file":   (None, "HALL_TOKEN_FILE"),
        "receipt_keys": (None, "HALL_RECEIPT_KEYS"),
        "rules_path":   (None, "HALL_RULES_PATH"),
        "policy_path":  (None, "HALL_POLICY_PATH"),
        "cors_origins": ("*", "HALL_CORS_ORIGINS"),
        "tls_cert":     (None, "HALL_TLS_CERT"),
        "tls_key":      (None, "HALL_TLS_KEY"),
        "max_body":     (DEFAULT_MAX_BODY, "HALL_MAX_BODY"),
        "access_log":   (True, "HALL_ACCESS_LOG"),
        "approval_ttl": (3600, "HALL_APPROVAL_TTL"),
        "tenants":      (None, "HALL_TENANTS"),
        "attest_dirs":  ((), "HALL_ATTEST_DIRS"),
        "require_attestation": (False, "HALL_REQUIRE_ATTESTATION"),
        "allow_plain_http": (False, "HALL_ALLOW_PLAIN_HTTP"),
        "idle_timeout": (30, "HALL_IDLE_TIMEOUT"),
        "request_timeout": (10, "HALL_REQUEST_TIMEOUT"),
        "max_connections": (256, "HALL_MAX_CONNECTIONS"),
        "rate_limit": (None, "HALL_RATE_LIMIT"),
        "rate_burst": (None, "HALL_RATE_BURST"),
        "busy_timeout": (5000, "HALL_BUSY_TIMEOUT_MS"),
        "drain_seconds": (10, "HALL_DRAIN_SECONDS"),
        "max_header_line": (65536, "HALL_MAX_HEADER_LINE"),
        "max_headers": (100, "HALL_MAX_HEADERS"),
        "events_retained": (10000, "HALL_EVENTS_RETAINED"),
        "retention_days": (0, "HALL_RETENTION_DAYS"),
        "log_format": ("text", "HALL_LOG_FORMAT"),
    }

    def __init__(self, **settings):
        self._origins = None                    # (cors_origins, parsed set), made when first asked
        for name, (default, _variable) in self.FIELDS.items():
            setattr(self, name, settings.pop(name, default))
        if settings:
            raise TypeError("unknown settings: " + ", ".join(sorted(settings)))

    @classmethod
    def load(cls, flags=None, environ=None):
        """Settings from the environment, overridden by parsed ``flags``."""
        environ = os.environ if environ is None else environ
        flags = vars(flags) if flags is not None else {}
        settings = {}
        for name, (default, variable) in cls.FIELDS.items():
            value = flags.get(name)
            if value is None and environ.get(variable, "") != "":
                value = environ[variable]
            if value is not None:
                settings[name] = value
        config = cls(**settings)
        config.port = _parse_int_setting("port", config.port, 0, 65535)
        config.max_body = _parse_int_setting("max body", config.max_body, 1, 1 << 30)
        config.access_log = _parse_bool_setting("access log", config.access_log)
        config.approval_ttl = _parse_int_setting("approval ttl", config.approval_ttl, 1,
                                                 365 * 86400)
        config.require_attestation = _parse_bool_setting("require attestation",
                                                         config.require_attestation)
        config.allow_plain_http = _parse_bool_setting("allow plain http",
                                                      config.allow_plain_http)
        for name, low, high in (("idle_timeout", 1, 3600), ("request_timeout", 1, 3600),
                                ("max_connections", 1, 100000), ("busy_timeout", 0, 600000),
                                ("drain_seconds", 0, 3600), ("events_retained", 1, 10 ** 7),
                                ("max_header_line", 256, 1 << 20), ("max_headers", 8, 10000),
                                ("retention_days", 0, 100000)):
            setattr(config, name, _parse_int_setting(name.replace("_", " "),
                                                     getattr(config, name), low, high))
        if config.rate_limit is not None:
            config.rate_limit = _parse_int_setting("rate limit", config.rate_limit, 0, 10 ** 6)
        if config.rate_burst is not None:
            config.rate_burst = _parse_int_setting("rate burst", config.rate_burst, 1, 10 ** 7)
        if isinstance(config.tenants, str):
            config.tenants = [t.strip() for t in config.tenants.split(",") if t.strip()]
            if not config.tenants:              # (",": a slip, not "deny every tenant")
                raise ConfigError("HALL_TENANTS names no tenant: list them, comma-separated")
        if isinstance(config.attest_dirs, str):
            config.attest_dirs = [d for d in config.attest_dirs.split(os.pathsep) if d]
        for directory in config.attest_dirs:
            if not os.path.isdir(directory):
                raise ConfigError("attestation directory %s does not exist" % directory)
        if config.require_attestation and not config.attest_dirs:
            raise ConfigError("HALL_REQUIRE_ATTESTATION needs HALL_ATTEST_DIRS: the "
                              "directories worker code may be attested from")
        if config.log_format not in ("text", "json"):
            raise ConfigError("log format must be text or json, got %r" % config.log_format)
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ConfigError("TLS needs both HALL_TLS_CERT and HALL_TLS_KEY")
        return config

    @property
    def token_path(self):
        """Where the first-start admin token is written: beside the database."""
        if self.token_file:
            return self.token_file
        if self.db_path == ":memory:":
            return "hall.token"
        return os.path.join(os.path.dirname(os.path.abspath(self.db_path)), "hall.token")

    @property
    def receipt_keys_path(self):
        """The receipt keys file: beside the database (None: kept in memory)."""
        if self.receipt_keys:
            return self.receipt_keys
        if self.db_path == ":memory:":
            return None
        return os.path.abspath(self.db_path) + ".keys"

    @property
    def loopback(self):
        return is_loopback(self.host)

    @property
    def requests_per_second(self):
        """The rate limit per client: as set, else off on loopback and 100/s elsewhere."""
        if self.rate_limit is not None:
            return self.rate_limit
        return 0 if self.loopback else 100

    def allowed_origin(self, origin):
        """The Access-Control-Allow-Origin value for a request's Origin."""
        if self._origins is None or self._origins[0] != self.cors_origins:
            listed = frozenset(o.strip() for o in str(self.cors_origins).split(",") if o.strip())
            self._origins = (self.cors_origins, listed)
        listed = self._origins[1]
        if "*" in listed:
            return "*"
        return origin if origin in listed else None


def _parse_int_setting(label, value, low, high):
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError("%s must be an integer, got %r" % (label, value))
    if not low <= number <= high:
        raise ConfigError("%s must be between %d and %d, got %d" % (label, low, high, number))
    return number


def _parse_bool_setting(label, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError("%s must be on or off, got %r" % (label, value))


@functools.lru_cache(maxsize=64)               # asked on every open read: parse once
def is_loopback(host):
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sent_from_this_host(headers):
    """Is this request one a program of this host sent -- the only kind the
    endpoints open on loopback answer without a token?  Not one a web page
    of another site made (a browser names the page's site in ``Origin`` on
    every cross-site request and every POST: a page must not read the log
    nor enroll a worker through the operator's browser), nor one sent to a
    name of such a site pointed at 127.0.0.1 (DNS rebinding: ``Host`` names it)."""
    return _names_this_host(headers.get("Host"), "//") and \
        _names_this_host(headers.get("Origin"), "")


@functools.lru_cache(maxsize=64)
def _names_this_host(value, prefix):
    """True for a Host (prefix "//") or Origin that names loopback, or is absent."""
    if value is None:
        return True
    try:
        name = urlsplit(prefix + value).hostname
    except ValueError:                          # (an unclosed [ in an IPv6 address)
        return False
    return bool(name) and (is_loopback(name) or name.endswith(".localhost"))


###############################################################################
# 2. Utilities
###############################################################################

class HallError(Exception):
    """A request the hall refuses: an HTTP status, a sentence, maybe a code."""

    def __init__(self, status, message, code=None, headers=None):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def body(self):
        body = {"error": self.message}
        if self.code:
            body["code"] = self.code
        return body


class Unavailable(HallError):
    """The database cannot take the write now; the client may retry."""

    def __init__(self, message="the database is busy; retry shortly"):
        HallError.__init__(self, 503, message, "DB_UNAVAILABLE", {"Retry-After": "1"})


_NOW_SECOND = [(None, "")]               # (second, its text): made once a second


def now_iso():
    """UTC, ISO 8601 with microseconds and +00:00: text order is time order.
    (datetime's isoformat, but the text of each second is made once.)"""
    second, micro = divmod(time.time_ns() // 1000, 1000000)
    cached = _NOW_SECOND[0]                 # (one read: another thread may replace it)
    if cached[0] != second:
        cached = _NOW_SECOND[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                         time.gmtime(second)))
    return "%s.%06d+00:00" % (cached[1], micro)


def utc_day(timestamp=None):
    return (timestamp or now_iso())[:10]


_TIMESTAMP = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?)?"
    r" ?([Zz]|[+-][0-9]{2}(?::?[0-5][0-9])?)?$")


def parse_timestamp(text):
    """ISO 8601 text -> canonical UTC form, or None when it is not a time.

    Accepts a date, optional time, fraction and offset (``Z``, ``+02:00``,
    ``+0200``, ``+02``); a time without offset is taken as UTC."""
    match = _TIMESTAMP.match(text.strip()) if isinstance(text, str) else None
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    tz = datetime.timezone.utc
    if offset and offset not in "Zz":
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        delta = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
        try:
            tz = datetime.timezone(sign * delta)
        except ValueError:
            return None
    try:
        moment = datetime.datetime(int(year), int(month), int(day), int(hour or 0),
                                   int(minute or 0), int(second or 0), micro, tzinfo=tz)
        moment = moment.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        return None
    return moment.isoformat(timespec="microseconds")


class _RandomPool(object):
    """Random bytes from os.urandom, fetched 4 KiB at a time: each call of
    the system would let the other threads take the interpreter (and this
    one wait to get it back), which under load costs more than the call."""

    def __init__(self, size=4096):
        self._size, self._buffer, self._lock = size, b"", threading.Lock()

    def take(self, count):
        with self._lock:
            if len(self._buffer) < count:
                self._buffer = os.urandom(self._size)
            taken, self._buffer = self._buffer[:count], self._buffer[count:]
            return taken


_RANDOM = _RandomPool()


def new_id():
    """A version 4 UUID string (the version nibble 4, the variant bits 10)
    whose first 48 bits are the time in milliseconds and the other 74
    random.  Time first, ids made one after another sort together: each new
    decision's entry in the log's primary-key index lands on the page the
    last one did, not on a random page of it, which halves the pages a
    commit writes.  74 random bits a millisecond keep them unique."""
    raw = _RANDOM.take(16)
    text = "%012x" % (int(time.time() * 1000) & 0xFFFFFFFFFFFF) + raw.hex()[12:]
    return "%s-%s-4%s-%x%s-%s" % (text[:8], text[8:12], text[13:16],
                                  0x8 | (raw[8] >> 4) & 0x3, text[17:20], text[20:])


# The encoders are made once: json.dumps with arguments builds one per call.
# Nothing the hall encodes refers to itself, so the cycle check is skipped.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"),
                                   check_circular=False).encode


def _blob_text(value):
    """A value the hall never writes but may read back from an edited file
    (a blob) is shown by _JSON, and kept in an audit entry's detail, by its
    repr rather than failing the answer or the write.  Anything else is
    still a fault."""
    if isinstance(value, bytes):
        return repr(value)
    raise TypeError("%s is not JSON serializable" % type(value).__name__)


_STRICT_JSON = json.JSONEncoder(check_circular=False, allow_nan=False,
                                default=_blob_text).encode
_JSON_STRING = json.encoder.encode_basestring_ascii     # a str, as both encoders write it


def _JSON(value):
    """As json.dumps(value), but always strict JSON: a float JSON has no
    number for (infinity, edited into the file) is shown as its repr."""
    try:
        return _STRICT_JSON(value)
    except ValueError:
        return _STRICT_JSON(_finite_floats(value))


def _finite_floats(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: _finite_floats(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_floats(item) for item in value]
    return value


def canonical_json(value):
    """The one serialisation that hashes are taken over."""
    return _CANONICAL_JSON(value)


def sha256_tag(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compute_artifact_hash(record):
    """The artifact_hash a worker record must carry to enroll: sha256 of the
    canonical JSON of the record without its artifact_hash field."""
    body = {k: v for k, v in record.items() if k != "artifact_hash"}
    return sha256_tag(canonical_json(body))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")


def clean_id(value):
    """An id fit for telemetry and logs: control characters removed."""
    if value is None:
        return None
    value = str(value)
    return value if value.isprintable() else _CONTROL_CHARS.sub("", value)


def _reject_constant(name):
    raise ValueError("%s is not a JSON number" % name)


def _finite_float(text):
    number = float(text)
    if math.isinf(number) or math.isnan(number):
        raise ValueError("number out of range: " + text[:40])
    return number


def _double_sized_int(text):
    if len(text.lstrip("-")) > 308:             # beyond any double (and slow to convert)
        raise ValueError("number out of range: " + text[:40])
    return int(text)


def _no_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key %r" % key[:80])
        result[key] = value
    return result


_BODY_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                                 parse_int=_double_sized_int, object_pairs_hook=_no_duplicate_keys)
# Escapes that may hide a NUL or a lone surrogate: only then are strings walked.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


def parse_json_body(raw, what="request body"):
    """Request bytes -> a JSON value, or HallError(400) saying what is wrong.

    Refuses what would later break storage or make the document ambiguous:
    invalid UTF-8, NaN/Infinity, numbers beyond a double, duplicate keys,
    NUL characters (they cut strings short in SQLite's functions and most
    tools that read the file), lone surrogates, and nesting deeper than
    MAX_JSON_DEPTH."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HallError(400, "%s is not valid UTF-8" % what)
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise HallError(400, "%s must be a JSON object" % what)
    try:
        value = _BODY_DECODER.decode(text)
    except RecursionError:
        raise HallError(400, "%s is nested too deeply" % what)
    except ValueError as exc:
        raise HallError(400, "%s is not valid JSON: %s" % (what, str(exc)[:200]))
    check_strings = _SUSPECT_ESCAPE.search(text) is not None
    if check_strings or text.count("{") + text.count("[") > MAX_JSON_DEPTH:
        _check_json_value(value, check_strings, what)   # (else it cannot be too deep)
    return value


def _check_json_value(value, check_strings, what):
    """Iteratively bound nesting depth (and find NULs and lone surrogates)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values()) + (list(item.keys()) if check_strings else [])
        elif isinstance(item, list):
            children = item
        else:
            if check_strings and isinstance(item, str):
                if "\x00" in item:
                    raise HallError(400, "%s has a NUL character in a string" % what)
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise HallError(400, "%s has a lone UTF-16 surrogate in a string" % what)
            continue
        if depth > MAX_JSON_DEPTH:
            raise HallError(400, "%s is nested deeper than %d levels" % (what, MAX_JSON_DEPTH))
        stack.extend((child, depth + 1) for child in children)


def ascii_number(text):
    """The non-negative integer ``text`` writes in at most 18 ASCII digits
    (so it fits SQLite's integers), else None.  (str.isdigit alone admits
    "\u00b2" and other digits int() refuses.)"""
    text = text.strip()
    if 0 < len(text) <= 18 and text.isascii() and text.isdigit():
        return int(text)
    return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def require_object(value):
    """A request body must be a JSON object."""
    if not isinstance(value, dict):
        raise HallError(400, "request body must be a JSON object")
    return value


def _required_string(body, field):
    """A field that must be a non-blank string."""
    if not isinstance(body.get(field), str) or not body[field].strip():
        raise HallError(400, "%s is required" % field)
    return body[field]


def _optional_string(body, field, default=None):
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, str):
        raise HallError(400, "%s must be a string" % field)
    return value


###############################################################################
# 3. Storage
###############################################################################
#
# The three tables of the reference keep their names and columns exactly, so a
# hall.db written by the reference server opens and is served without loss.
# Everything newer arrives by forward migrations keyed on PRAGMA user_version,
# each applied in one transaction.

AUDIT_NO_UPDATE = """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN
            SELECT RAISE(ABORT, 'the audit trail is append-only');
        END"""

MIGRATIONS = [
    # 1 -- the reference schema (a no-op on a database the reference made).
    [
        """CREATE TABLE IF NOT EXISTS enrollments (
            enrollment_id TEXT PRIMARY KEY,
            worker_id TEXT NOT NULL UNIQUE,
            worker_species_id TEXT NOT NULL,
            capabilities TEXT NOT NULL,
            risk_tier TEXT NOT NULL,
            enrolled_at TEXT NOT NULL,
            artifact_hash TEXT NOT NULL,
            record_json TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS decisions (
            decision_id TEXT PRIMARY KEY,
            decided_at TEXT NOT NULL,
            capability_id TEXT NOT NULL,
            tenant_id TEXT NOT NULL DEFAULT '',
            env TEXT NOT NULL DEFAULT 'dev',
            denied INTEGER NOT NULL DEFAULT 0,
            deny_reason TEXT,
            selected_worker TEXT,
            blast_score INTEGER,
            artifact_hash TEXT)""",
        """CREATE TABLE IF NOT EXISTS alerts (
            alert_id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            level TEXT NOT NULL,
            code TEXT NOT NULL,
            message TEXT NOT NULL,
            worker_id TEXT,
            capability_id TEXT)""",
    ],
    # 2 -- indexes for the list endpoints, per-day counts kept by triggers so
    # /status costs the same at ten million decisions as at ten, what a route
    # decision adds to the documented row, and hashed API tokens.
    [
        "CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions(decided_at)",
        "CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts(created_at)",
        "CREATE INDEX IF NOT EXISTS enrollments_by_time ON enrollments(enrolled_at)",
        "ALTER TABLE enrollments ADD COLUMN updated_at TEXT",
        "ALTER TABLE decisions ADD COLUMN source TEXT",
        "ALTER TABLE decisions ADD COLUMN correlation_id TEXT",
        "ALTER TABLE decisions ADD COLUMN matched_rule_id TEXT",
        "ALTER TABLE decisions ADD COLUMN worker_id TEXT",
        """CREATE TABLE decision_days (
            day TEXT PRIMARY KEY,
            total INTEGER NOT NULL DEFAULT 0,
            denied INTEGER NOT NULL DEFAULT 0)""",
        """INSERT INTO decision_days(day, total, denied)
            SELECT substr(decided_at, 1, 10), count(*), sum(denied != 0)
            FROM decisions GROUP BY substr(decided_at, 1, 10)""",
        """CREATE TRIGGER decisions_counted AFTER INSERT ON decisions BEGIN
            INSERT OR IGNORE INTO decision_days(day) VALUES (substr(NEW.decided_at, 1, 10));
            UPDATE decision_days SET total = total + 1, denied = denied + (NEW.denied != 0)
                WHERE day = substr(NEW.decided_at, 1, 10);
        END""",
        """CREATE TRIGGER decisions_uncounted AFTER DELETE ON decisions BEGIN
            UPDATE decision_days SET total = total - 1, denied = denied - (OLD.denied != 0)
                WHERE day = substr(OLD.decided_at, 1, 10);
        END""",
        """CREATE TRIGGER decisions_recounted AFTER UPDATE OF decided_at, denied ON decisions BEGIN
            UPDATE decision_days SET total = total - 1, denied = denied - (OLD.denied != 0)
                WHERE day = substr(OLD.decided_at, 1, 10);
            INSERT OR IGNORE INTO decision_days(day) VALUES (substr(NEW.decided_at, 1, 10));
            UPDATE decision_days SET total = total + 1, denied = denied + (NEW.denied != 0)
                WHERE day = substr(NEW.decided_at, 1, 10);
        END""",
        """CREATE TABLE tokens (
            token_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            tenant TEXT,
            created_at TEXT NOT NULL,
            last_used_at TEXT,
            revoked_at TEXT)""",
    ],
    # 3 -- governance: hall-wide settings (safe mode, policy, tenants), the ban
    # list, human approvals, and the append-only audit trail of admin actions.
    [
        """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            updated_by TEXT)""",
        """CREATE TABLE bans (
            sha256 TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_by TEXT)""",
        """CREATE TABLE approvals (
            approval_id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            status TEXT NOT NULL,
            input_hash TEXT NOT NULL,
            deny_code TEXT NOT NULL,
            reason TEXT NOT NULL,
            capability_id TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            env TEXT NOT NULL,
            data_label TEXT NOT NULL,
            decided_at TEXT,
            decided_by TEXT,
            decision_note TEXT,
            used_at TEXT,
            used_decision_id TEXT)""",
        "CREATE INDEX approvals_by_time ON approvals(created_at)",
        "CREATE INDEX approvals_by_input ON approvals(input_hash, status)",
        """CREATE TABLE audit (
            audit_id TEXT PRIMARY KEY,
            at TEXT NOT NULL,
            token_id TEXT,
            action TEXT NOT NULL,
            target TEXT,
            detail TEXT)""",
        "CREATE INDEX audit_by_time ON audit(at)",
        AUDIT_NO_UPDATE,
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN
            SELECT RAISE(ABORT, 'the audit trail is append-only');
        END""",
    ],
    # 4 -- a version of the registry bumped on every enrollment change, so a
    # running hall notices enrollments written by another process.
    [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('registry_version', 0)",
    ] + ["""CREATE TRIGGER enrollments_%s AFTER %s ON enrollments BEGIN
            UPDATE meta SET value = value + 1 WHERE key = 'registry_version';
        END""" % (event.lower(), event) for event in ("INSERT", "UPDATE", "DELETE")],
    # 5 -- the decision log as a tool: filtered pages by tenant or capability
    # stay index reads at any size.
    [
        "CREATE INDEX decisions_by_tenant ON decisions(tenant_id, decided_at)",
        "CREATE INDEX decisions_by_capability ON decisions(capability_id, decided_at)",
    ],
    # 6 -- the evidence chain: every decision, alert and audit entry carries
    # its place in one hash chain; rows written before it are sealed now.
    ["ALTER TABLE %s ADD COLUMN %s" % (table, column)
     for table in ("decisions", "alerts", "audit")
     for column in ("chain_seq INTEGER", "chain_hash TEXT")] +
    ["CREATE INDEX %s_by_chain ON %s(chain_seq)" % (table, table)
     for table in ("decisions", "alerts", "audit")] + [
        """CREATE TABLE chain (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            head TEXT NOT NULL,
            sealed_seq INTEGER NOT NULL,
            sealed_at TEXT,
            head_mac TEXT)""",
        lambda conn, store: seal_existing_rows(conn, store.sign_head),
    ],
    # 7 -- new decisions are counted per day by the writer, once a batch
    # (Store._count_days), not by a trigger once a row: the trigger was
    # nearly half the cost of inserting a decision.  So only a hall inserts
    # decisions (another program's rows are not counted, nor chained).
    # Deleting or editing decisions still recounts through triggers, which
    # now make the day's row first: a batch may delete a decision it wrote
    # before that day has its row (the counts are added at its end).
    ["DROP TRIGGER IF EXISTS decisions_counted",
     "DROP TRIGGER decisions_uncounted",
     "DROP TRIGGER decisions_recounted",
     """CREATE TRIGGER decisions_uncounted AFTER DELETE ON decisions BEGIN
            INSERT OR IGNORE INTO decision_days(day) VALUES (substr(OLD.decided_at, 1, 10));
            UPDATE decision_days SET total = total - 1, denied = denied - (OLD.denied != 0)
                WHERE day = substr(OLD.decided_at, 1, 10);
        END""",
     """CREATE TRIGGER decisions_recounted AFTER UPDATE OF decided_at, denied ON decisions BEGIN
            INSERT OR IGNORE INTO decision_days(day) VALUES (substr(OLD.decided_at, 1, 10));
            UPDATE decision_days SET total = total - 1, denied = denied - (OLD.denied != 0)
                WHERE day = substr(OLD.decided_at, 1, 10);
            INSERT OR IGNORE INTO decision_days(day) VALUES (substr(NEW.decided_at, 1, 10));
            UPDATE decision_days SET total = total + 1, denied = denied + (NEW.denied != 0)
                WHERE day = substr(NEW.decided_at, 1, 10);
        END"""],
    # 8 -- the head's MAC covers the seal too (what migration 6 says it
    # sealed, and when), so that an edit of that record shows.
    [lambda conn, store: sign_the_seal(conn, store)],
    # 9 -- a version of the governance settings (safe mode, tenants, policy)
    # and the bans, bumped on every change, so that a hall follows what
    # another process sharing the file changed: safe mode holds in all.
    ["INSERT INTO meta (key, value) VALUES ('governance_version', 0)"] +
    ["""CREATE TRIGGER %s_%s AFTER %s ON %s BEGIN
            UPDATE meta SET value = value + 1 WHERE key = 'governance_version';
        END""" % (table, event.lower(), event, table)
     for table in ("settings", "bans") for event in ("INSERT", "UPDATE", "DELETE")],
]
# From this schema version on the head's MAC covers the seal (head_mac).
SEAL_SIGNED_FROM = 8

DECISION_COLUMNS = ("decision_id", "decided_at", "capability_id", "tenant_id", "env", "denied",
                    "deny_reason", "selected_worker", "blast_score", "artifact_hash")
ALERT_COLUMNS = ("alert_id", "created_at", "level", "code", "message", "worker_id",
                 "capability_id")

Enrollment = namedtuple("Enrollment", "enrollment_id worker_id worker_species_id capabilities "
                                      "risk_tier enrolled_at artifact_hash record")
Token = namedtuple("Token", "token_id name scopes tenant")
APPROVAL_COLUMNS = ("approval_id", "created_at", "expires_at", "status", "input_hash",
                    "deny_code", "reason", "capability_id", "tenant_id", "env", "data_label",
                    "decided_at", "decided_by", "decision_note", "used_at", "used_decision_id")
# The tables of the evidence chain and the columns each entry is hashed over
# (their first column names the entry).
CHAINED_COLUMNS = {
    "decisions": DECISION_COLUMNS + ("source", "correlation_id", "matched_rule_id", "worker_id"),
    "alerts": ALERT_COLUMNS,
    "audit": ("audit_id", "at", "token_id", "action", "target", "detail"),
}
CHAIN_TIME = {"decisions": "decided_at", "alerts": "created_at", "audit": "at"}
_DECIDED_AT = CHAINED_COLUMNS["decisions"].index("decided_at")
_DENIED = CHAINED_COLUMNS["decisions"].index("denied")
CHAIN_GENESIS = "0" * 64
TOKEN_COLUMNS = ("token_id", "name", "scopes", "tenant", "created_at", "last_used_at",
                 "revoked_at")
AUDIT_COLUMNS = CHAINED_COLUMNS["audit"]
# An approval past its expiry reads as "expired" whatever its stored status.
APPROVAL_STATUS_SQL = ("CASE WHEN status IN ('pending', 'approved') AND expires_at <= ? "
                       "THEN 'expired' ELSE status END")


class StoreError(Exception):
    """The database file cannot be used at all (start-up stops)."""


class MustWait(Exception):
    """Raised on a thread that must not wait (the HTTP event loop, while it
    collects writes) instead of waiting: for a write whose result the caller
    uses, a busy read connection, another thread's computation.  Nothing has
    been done; the request is answered by a thread that may wait."""


def _complain(line):
    """A line on stderr, from a thread that must go on even if stderr is gone."""
    with contextlib.suppress(Exception):
        print(line, file=sys.stderr)


class WriteJob(object):
    """One piece of work for the writer thread, and its outcome.

    ``work(conn)`` is any function; a job that only appends one entry to the
    evidence chain says so with ``append=(table, values, digest)`` instead,
    and the writer appends all of a batch's entries first, without a savepoint
    each.  ``done`` is a lock held until the job's transaction has committed
    (or failed).  ``then(result)`` runs once it committed, and must not
    change the answer of the request that wrote (the event loop may have
    encoded it already); ``notify`` is called (by the writer) when a job
    nobody waits for has its outcome."""

    __slots__ = ("work", "append", "done", "result", "error", "then", "notify", "best_effort")

    def __init__(self, work=None, append=None, wait=True, then=None):
        self.work = work
        self.append = append
        self.done = threading.Lock() if wait else None
        if wait:
            self.done.acquire()
        self.result = self.error = self.notify = None
        self.then = then
        # An alert: its failure fails no request (see EventLoop.complete).
        self.best_effort = append is not None and append[0] == "alerts"


# What Store.upsert_enrollment did: ``registry_version`` is read only when
# nothing changed (so the caller can tell whether its registry is current).
Upsert = namedtuple("Upsert", "created changed enrollment_id enrolled_at registry_version")


class Store(object):
    """The SQLite file.

    Writes: one writer thread owns the write connection and runs the work
    queued by every request in one transaction per batch (each piece in its
    own savepoint), so concurrent writers share one commit and one fsync --
    group commit.  A request is answered only after its batch committed.
    While more writes are waiting, the writer tells a committed batch so only
    once it has written the next batch's rows: its requests, woken earlier,
    would all want the interpreter back at once and the writer, between its
    SQLite calls, would wait for them.  It tells at once when no write waits,
    or when another connection holds the write lock (see _begin).

    The HTTP event loop writes its own requests' appends instead, the same
    way but on its own thread (collecting, commit_here), and hands them to
    the writer thread only when that would mean waiting for a lock.

    Reads: a small pool of read connections (WAL lets them read beside the
    writer).  The pool is bounded: each connection has its own page cache.

    Checkpoints (copying the WAL back into the database file) are made by a
    thread of their own (_checkpoint_loop), not by the commit that fills the
    WAL: that commit's requests, and every request queued behind them, would
    wait the milliseconds a checkpoint takes -- the slowest percent of all
    answers.  The write connection still checkpoints by itself should the WAL
    grow far past its size (CHECKPOINT_BACKSTOP pages), so it stays bounded
    whatever happens to that thread.

    ``generation`` counts committed batches, so callers can cache what they
    read until the next write."""

    MAX_BATCH = 512
    MAX_READERS = 4
    CHECKPOINT_EVERY = 8                        # commits between two checkpoints
    CHECKPOINT_RESTART = 2000                   # WAL pages: start the WAL over
    CHECKPOINT_BACKSTOP = 8000                  # WAL pages: the writer checkpoints
    WAIT_SLICE_MS = 100                         # a wait for the write lock, a slice at a time

    def __init__(self, path, busy_timeout_ms=5000, keyring=None):
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        # The chain's head is kept with a MAC under the hall's key, so that a
        # rewrite of the head (to hide deleted newest entries) shows.
        self.keyring = keyring
        self.memory = path == ":memory:"
        self.generation = 0
        self._write_lock = threading.Lock()     # the write connection's owner
        self._jobs = queue.SimpleQueue()        # C: no Python-level lock per put
        self._writer_thread = None
        # The read connections, and a None for each one not opened yet: taking
        # from this queue is taking one of MAX_READERS slots.
        self._readers = queue.SimpleQueue()
        for _ in range(self.MAX_READERS):
            self._readers.put(None)
        self.on_audit = None                    # called with each audit entry once committed
        self._batch_audit = []                  # audit entries of the batch being committed
        self._batch_days = {}                   # its new decisions: day -> (total, denied)
        self._chain = None                      # (seq, head) of the chain while writing
        self._untold = []                       # the last batch's jobs, not yet woken
        self._tell_lock = threading.Lock()      # _untold is told by the writer or the loop
        self._collecting = threading.local()    # .into = (jobs, notify): see collecting
        self._commits = 0                       # committed batches, for checkpoints
        self._checkpoint_due = threading.Event()
        self._checkpointer = None               # its thread, from the first commit on
        self._closing = False
        self._give_up_at = float("inf")         # when waits for the write lock end (close)
        self._submit_lock = threading.Lock()    # _closing and the writer thread's start
        try:
            self._writer = self._connect()
            try:
                self._writer.execute("PRAGMA journal_mode=WAL").fetchone()
                # FULL: a commit is on disk before the hall answers 2xx, so an
                # acknowledged write survives a crash of the process or the host.
                self._writer.execute("PRAGMA synchronous=FULL")
                self._migrate()
                # A batch tries for the write lock without waiting first (_begin).
                self._writer.execute("PRAGMA busy_timeout=0")
                self._writer.execute("PRAGMA wal_autocheckpoint=%d" % self.CHECKPOINT_BACKSTOP)
            except BaseException:
                self._writer.close()            # a file refused is not held open
                raise
        except sqlite3.DatabaseError as exc:
            raise StoreError("cannot use database %s: %s" % (path, exc))

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000.0,
                               isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=%d" % self.busy_timeout_ms)
        return conn

    def _migrate(self):
        version = self._writer.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError("database %s has schema version %d; this hall.py knows only up "
                             "to %d (it was written by a newer hall)"
                             % (self.path, version, len(MIGRATIONS)))
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    if callable(statement):     # a step that needs Python (hashing)
                        statement(conn, self)
                    else:
                        conn.execute(statement)
                conn.execute("PRAGMA user_version=%d" % number)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:         # (SQLite may have rolled back already)
                    conn.execute("ROLLBACK")
                raise

    def _committed(self):
        """After each commit (the write lock held): now and then, a
        checkpoint (see the class)."""
        self.generation += 1
        self._commits += 1
        if self._commits % self.CHECKPOINT_EVERY or self.memory or self._closing or \
                self._checkpointer is False:
            return
        if self._checkpointer is None:
            thread = threading.Thread(target=self._checkpoint_loop, name="hall-checkpointer",
                                      daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:         # out of threads: checkpoint as SQLite would
                _complain("[hall-api] checkpoints stay with the commits: %s" % exc)
                self._checkpointer = False
                with contextlib.suppress(sqlite3.Error):
                    self._writer.execute("PRAGMA wal_autocheckpoint=1000")
                return
            self._checkpointer = thread
        self._checkpoint_due.set()

    def _checkpoint_loop(self):
        """Copy what the WAL holds into the file, without stopping writers
        (PASSIVE).  Once the WAL is long, finish the copy while holding this
        hall's write lock, so that the next commit starts the WAL over from
        its beginning (RESTART); this hall's writes wait for the lock
        meanwhile, and a reader still using the WAL is not waited for (the
        restart is tried again later)."""
        conn, complained = None, None
        while True:
            self._checkpoint_due.wait()
            self._checkpoint_due.clear()
            if self._closing:
                if conn is not None:
                    conn.close()
                return
            try:
                if conn is None:                # (again next time if this fails)
                    if not os.path.exists(self.path):   # connecting would make it, empty
                        raise sqlite3.OperationalError("%s is gone" % self.path)
                    opened = self._connect()
                    opened.execute("PRAGMA busy_timeout=0")
                    conn = opened
                _busy, pages, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if pages >= self.CHECKPOINT_RESTART and self._write_lock.acquire(timeout=0.1):
                    try:
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                    finally:
                        self._write_lock.release()
            except sqlite3.Error as exc:        # the writer's own checkpoints still bound it
                if complained is None or time.monotonic() - complained > 60:
                    complained = time.monotonic()
                    _complain("[hall-api] a checkpoint failed: %s" % exc)

    def close(self, give_up_at=None):
        """Finish the writes queued and close.  Writes still waiting for
        another process's write lock at ``give_up_at`` (time.monotonic())
        fail then, rather than wait out the busy timeout: a stop keeps to its
        deadline."""
        if give_up_at is not None:
            self._give_up_at = give_up_at
        # Nothing is committed (_committed) or queued (_submit) meanwhile:
        # whatever comes later fails at once rather than wait for ever.
        with self._write_lock, self._submit_lock:
            self._closing = True
            checkpointer, writer = self._checkpointer, self._writer_thread
            if writer is not None:
                self._jobs.put(None)
        if writer is not None:
            writer.join()
        if checkpointer:
            self._checkpoint_due.set()
            checkpointer.join()
        with self._write_lock:
            if not self.memory:
                waiting = min(self.busy_timeout_ms / 1000.0, self._give_up_at - time.monotonic())
                with contextlib.suppress(sqlite3.Error):
                    self._writer.execute("PRAGMA busy_timeout=%d" % max(0, waiting * 1000))
                    self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._writer.close()
        while True:
            try:
                conn = self._readers.get_nowait()
            except queue.Empty:
                break
            if conn is not None:
                conn.close()

    @property
    def writer_alive(self):
        return self._writer_thread is None or self._writer_thread.is_alive()

    @contextlib.contextmanager
    def reading(self):
        """A read connection (busy or unreadable database: 503, not 500)."""
        if self.memory:                 # one in-memory database: share the writer
            with self._write_lock:
                yield self._writer
            return
        try:
            if self.may_wait():
                conn = self._readers.get(timeout=self.busy_timeout_ms / 1000.0)
            else:
                conn = self._readers.get_nowait()
        except queue.Empty:
            if not self.may_wait():
                raise MustWait()
            raise Unavailable("every read connection is busy; retry shortly")
        try:
            if conn is None:
                opened = self._connect()
                try:
                    opened.execute("PRAGMA query_only=1")
                except BaseException:
                    opened.close()
                    raise
                conn = opened
            yield conn
        except sqlite3.OperationalError as exc:
            raise Unavailable("the database cannot be read now: %s" % exc)
        finally:
            if self._closing and conn is not None:  # read while closing: close() has
                conn.close()                        # emptied the pool already
                conn = None
            self._readers.put(conn)

    def write(self, work=None, append=None, timeout=-1, then=None):
        """Run ``work(conn)`` (or append the chain entry ``append=(table,
        values, digest)``) in the writer's next transaction; return what it returned
        once that transaction committed, or raise what it raised (a locked,
        read-only or full database: Unavailable, a 503).  ``then(result)``
        runs once it committed.

        On a thread that collects its appends (the HTTP event loop, see
        collecting) an append is only collected: it returns None, and the
        collector commits it (commit_here) and holds the request's answer
        until it has its outcome, then runs ``then``.  So code whose next step
        needs the append committed puts that step in ``then``.  Any other
        write raises MustWait there."""
        job = WriteJob(work, append, then=then)
        collector = getattr(self._collecting, "into", None)
        if collector is not None:
            if append is None:
                raise MustWait()
            jobs, job.notify = collector
            jobs.append(job)
            return None
        self._submit(job)
        if not job.done.acquire(timeout=timeout):
            raise Unavailable("the writer did not answer within %s s" % timeout)
        if job.error is not None:
            raise job.error
        if then is not None:
            try:
                then(job.result)
            except Exception:                   # the write committed all the same
                traceback.print_exc()
        return job.result

    @contextlib.contextmanager
    def collecting(self, notify):
        """Within this block the calling thread's appends are collected, not
        written (see write); yields the list of them, for commit_here.
        ``notify()`` is called from the writer thread when some of them it
        was handed have their outcome."""
        jobs = []
        self._collecting.into = (jobs, notify)
        try:
            yield jobs
        finally:
            self._collecting.into = None

    def may_wait(self):
        """False on a thread collecting its writes (see MustWait)."""
        return getattr(self._collecting, "into", None) is None

    def commit_here(self, jobs, meanwhile=None):
        """Commit collected appends on the calling thread, the event loop,
        if that needs no waiting: the write connection is free and no other
        process holds the database's write lock.  Else they go to the writer
        thread, which waits (and notifies).  True if they have their outcome.

        Committing on the loop spares the writer thread's wait for the
        interpreter after each SQLite call, which the busy loop holds: it
        doubled the cost of a write.  The loop waits for the fsync instead;
        but ``meanwhile()``, called just before the COMMIT (which lets go of
        the interpreter while SQLite writes and syncs), can hand work to
        another thread, to be done during it."""
        if self._commit(jobs, wait=False, meanwhile=meanwhile):
            return True
        for job in jobs:
            self._submit(job)
        return False

    def defer(self, work):
        """Queue ``work(conn)`` without waiting for it (bookkeeping only)."""
        self._submit(WriteJob(work, wait=False))

    def _submit(self, job):
        with self._submit_lock:
            refusal = "the hall is stopping" if self._closing else None  # (writer gone, or going)
            if refusal is None and self._writer_thread is None:
                thread = threading.Thread(target=self._write_loop, name="hall-writer",
                                          daemon=True)
                try:
                    thread.start()
                    self._writer_thread = thread
                except RuntimeError as exc:     # out of threads: a 503, tried again later
                    refusal = "the database cannot take writes now: %s" % exc
            if refusal is None:
                self._jobs.put(job)
                return
        job.error = Unavailable(refusal)
        self._release([job])

    def _write_loop(self):
        while True:
            if self._jobs.empty():
                self._tell()
            batch, stopping = [self._jobs.get()], False
            while batch[-1] is not None and len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                batch.pop()
                stopping = True
            if batch:
                try:
                    self._commit(batch)
                except BaseException as exc:    # the writer must not die: fail this batch
                    self._abandon(batch, exc)
            if stopping:
                self._tell()
                return

    def _tell(self):
        """Wake the requests of the last batch: it has committed (or failed)."""
        with self._tell_lock:
            told, self._untold = self._untold, []
        self._release(told)

    @staticmethod
    def _release(jobs):
        notify = set()
        for job in jobs:
            if job.done is not None and job.done.locked():
                job.done.release()
            if job.notify is not None:
                notify.add(job.notify)
        for call in notify:
            call()

    def sign_head(self, seq, head, seal=None):
        if self.keyring is None:
            return None
        key_id, secret = self.keyring.signing_key()
        return head_mac(secret, key_id, seq, head, seal)

    def _check_head(self, conn, seq, head, mac, seal):
        """Before extending the chain: is its head the one this hall signed?
        If not (the head or the seal was rewritten, or the key file
        replaced), say so in the chain itself -- an audit entry verify-log
        reports -- rather than sign over it and lose the evidence, or stop
        taking writes."""
        if self.keyring is None:
            return
        key_id = str(mac).partition(":")[0]
        secret = self.keyring.secret(key_id)
        if secret is not None and head_signed_by({key_id: secret}, seq, head, mac, seal):
            return
        _complain("[hall-api] the evidence chain's head (place %d) or its seal is not signed "
                  "by this hall: recorded in the audit trail; run verify-log" % seq)
        self._audit(conn, (None, HEAD_REWRITTEN, None, {"seq": seq, "head": head,
                                                        "head_mac": mac}))

    def _abandon(self, batch, exc):
        """A batch whose _commit raised (and rolled back): fail its jobs (those
        not told their outcome already)."""
        self._tell()
        for job in batch:
            if job.done is None or job.done.locked():
                job.error = Unavailable("the write failed: %s" % type(exc).__name__)
        self._release(batch)
        _complain("[hall-api] a write batch failed: %r" % exc)

    def _commit(self, batch, wait=True, meanwhile=None):
        """One transaction for the batch.  The chain entries are appended
        first, one INSERT each (a savepoint around them would cost more than
        the inserts); everything else, and the entries from a failed INSERT
        on, runs job by job in savepoints, so one failing job rolls back
        alone.  The chain's head is read once the write lock is held and
        stored with the batch, so another process writing the same file
        continues the same chain.

        ``wait=False`` (commit_here): nothing is done, and False returned,
        if the write connection or the database's write lock is taken; the
        batch's jobs are then released at once, not at the next batch."""
        if not self._write_lock.acquire(wait):
            return False
        try:
            conn = self._writer
            self._batch_audit, self._batch_days = [], {}
            try:
                if not self._begin(conn, wait):
                    return False
                row = conn.execute("SELECT seq, head, head_mac, sealed_seq, sealed_at "
                                   "FROM chain").fetchone()
                if not (row and isinstance(row[0], int) and isinstance(row[1], str)):
                    raise StoreError("the evidence chain's head is missing or not a head "
                                     "(the file was edited: run verify-log)")
                seq, head, mac, seal = row[0], row[1], row[2], row[3:]
                self._chain = start = (seq, head)
                self._check_head(conn, seq, head, mac, seal)
            except (sqlite3.Error, StoreError) as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                for job in batch:
                    job.error = Unavailable("the database cannot take writes now: %s" % exc)
            else:
                appends = [job for job in batch if job.append is not None]
                singles = [job for job in batch if job.append is None]
                written = 0
                try:
                    for job in appends:
                        job.result = self._append(conn, *job.append)
                        written += 1
                except Exception:
                    # A failed INSERT leaves nothing behind (nor a place in the
                    # chain); the entries before it stay, the rest go alone.
                    singles.extend(appends[written:])
                for job in singles:
                    if conn.in_transaction:
                        self._run_alone(conn, job)
                self._tell()                    # the last batch: its rows are in
                try:
                    if not conn.in_transaction:
                        # SQLite gave up the whole transaction (a full disk, say):
                        # nothing of this batch was written.
                        raise sqlite3.OperationalError("the transaction was rolled back")
                    self._count_days(conn)
                    if self._chain != start:
                        conn.execute("UPDATE chain SET seq = ?, head = ?, head_mac = ? "
                                     "WHERE id = 1", self._chain + (
                                         self.sign_head(*self._chain, seal=seal),))
                    if meanwhile is not None:
                        meanwhile()
                    conn.execute("COMMIT")
                except Exception as exc:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    for job in batch:
                        if job.error is None:
                            job.error = Unavailable("the database cannot take writes now: %s"
                                                    % exc)
                else:
                    self._committed()
                    for entry in self._batch_audit if self.on_audit is not None else ():
                        try:
                            self.on_audit(entry)
                        except Exception as exc:    # the batch committed all the same
                            _complain("[hall-api] announcing an audit entry failed: %r" % exc)
        except BaseException:                   # (the caller fails the batch: _abandon)
            with contextlib.suppress(sqlite3.Error):
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
            raise
        finally:
            self._write_lock.release()
        self._tell()
        for job in batch:
            if job.done is None and job.error is not None and not isinstance(job.error,
                                                                             HallError):
                _complain("[hall-api] deferred write failed: %r" % job.error)
        if wait:
            with self._tell_lock:
                self._untold = batch            # woken by the next batch, or when none waits
        else:
            for job in batch:
                job.notify = None               # the caller knows
            self._release(batch)
        return True

    def _begin(self, conn, wait=True):
        """BEGIN IMMEDIATE; True once begun.  If another connection holds the
        write lock: False at once unless ``wait``; else the last batch's
        requests are woken first (their transaction committed) and only then
        is the lock waited for, as long as busy_timeout allows.  (The write
        connection's own busy timeout is 0: the wait is set here alone.)"""
        if self._try_begin(conn):
            return True
        if not wait:
            return False
        self._tell()
        # Waited for in slices, so that a stop (close) can cut the wait short.
        wait_until = time.monotonic() + self.busy_timeout_ms / 1000.0
        conn.execute("PRAGMA busy_timeout=%d" % min(self.busy_timeout_ms, self.WAIT_SLICE_MS))
        try:
            while time.monotonic() < min(wait_until, self._give_up_at):
                if self._try_begin(conn):
                    return True
        finally:
            conn.execute("PRAGMA busy_timeout=0")
        raise sqlite3.OperationalError("database is locked")

    @staticmethod
    def _try_begin(conn):
        """BEGIN IMMEDIATE within the connection's busy timeout: True once
        begun, False if another connection holds the write lock."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            return True
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return False

    def _run_alone(self, conn, job):
        conn.execute("SAVEPOINT job")
        chain, days = self._chain, dict(self._batch_days)
        try:
            job.result = (job.work(conn) if job.append is None
                          else self._append(conn, *job.append))
        except BaseException as exc:
            job.error = (Unavailable("the database cannot take writes now: %s" % exc)
                         if isinstance(exc, sqlite3.OperationalError) else exc)
            self._chain, self._batch_days = chain, days
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK TO job")
        with contextlib.suppress(sqlite3.Error):
            conn.execute("RELEASE job")

    def _append(self, conn, table, values, digest=None):
        """Write one entry (the values of CHAINED_COLUMNS[table]) at the head
        of the evidence chain; its place there (chain_seq) if written, False
        if not: a repeated decision_id is ignored and takes no place in the
        chain.  ``digest`` is the entry's entry_digest, when the caller
        computed it outside the writer thread."""
        seq, head = self._chain
        link = chain_link(head, seq + 1, table, digest or entry_digest(values))
        if conn.execute(APPEND_SQL[table], list(values) + [seq + 1, link]).rowcount != 1:
            return False
        self._chain = (seq + 1, link)
        if table == "decisions":
            day = values[_DECIDED_AT][:10]
            total, denied = self._batch_days.get(day, (0, 0))
            self._batch_days[day] = (total + 1, denied + (1 if values[_DENIED] else 0))
        return seq + 1

    def _count_days(self, conn):
        """Add the batch's new decisions to their days' counts (decision_days,
        which /status reads instead of counting the log)."""
        for day, (total, denied) in self._batch_days.items():
            conn.execute("INSERT OR IGNORE INTO decision_days(day) VALUES (?)", (day,))
            conn.execute("UPDATE decision_days SET total = total + ?, denied = denied + ? "
                         "WHERE day = ?", (total, denied, day))

    def _audit(self, conn, audit):
        """audit = (token_id, action, target, detail dict): one append-only row,
        announced (on_audit) once its batch has committed.  (A detail may hold
        values read from an edited file: see _blob_text.)"""
        token_id, action, target, detail = audit
        entry = {"audit_id": new_id(), "at": now_iso(), "token_id": token_id,
                 "action": action, "target": target, "detail": detail or {}}
        self._append(conn, "audit", [entry["audit_id"], entry["at"], token_id, action, target,
                                     json.dumps(entry["detail"], default=_blob_text)])
        self._batch_audit.append(entry)

    def version(self, of):
        """The version of the "registry" (enrollments) or of the "governance"
        settings and bans: bumped by a trigger on every change, by any process."""
        with self.reading() as conn:
            return conn.execute("SELECT value FROM meta WHERE key = ?", (of + "_version",)
                                ).fetchone()[0]

    # -- enrollments ---------------------------------------------------------

    def upsert_enrollment(self, worker_id, species, capabilities, risk_tier, artifact_hash,
                          record_json, namespace=None):
        """Insert or update by worker_id; returns an Upsert.  A worker enrolled
        again with the very record stored (as each one is when it starts)
        changes nothing: no write, no fsync, and no new registry version for
        every hall reading this file to rebuild.  With ``namespace`` (the
        caller's token is limited to it) a stored worker outside it is not
        replaced: HallError(403)."""
        now = now_iso()
        stored = (species, capabilities, risk_tier, artifact_hash, record_json)

        def unchanged(conn):
            """(the stored row or None, the Upsert if it is this very record)"""
            row = conn.execute("SELECT enrollment_id, enrolled_at, (SELECT value FROM meta "
                               "WHERE key = 'registry_version'), worker_species_id, "
                               "capabilities, risk_tier, artifact_hash, record_json "
                               "FROM enrollments WHERE worker_id = ?", (worker_id,)).fetchone()
            if row and namespace is not None:
                check_namespace(namespace, worker_namespace(worker_id, _json_object(row[7])))
            same = row and row[3:] == stored
            return row, Upsert(False, False, row[0], row[1], row[2]) if same else None

        # Told from a read, without queueing for the writer: most enrollments
        # are a worker starting again with the record it had.
        with self.reading() as conn:
            same = unchanged(conn)[1]
        if same:
            return same

        def work(conn):
            row, same = unchanged(conn)
            if same:
                return same
            if row:
                conn.execute("UPDATE enrollments SET worker_species_id = ?, capabilities = ?, "
                             "risk_tier = ?, artifact_hash = ?, record_json = ?, updated_at = ? "
                             "WHERE worker_id = ?",
                             (species, capabilities, risk_tier, artifact_hash, record_json, now,
                              worker_id))
                return Upsert(False, True, row[0], row[1], None)
            enrollment_id = new_id()
            conn.execute("INSERT INTO enrollments (enrollment_id, worker_id, worker_species_id, "
                         "capabilities, risk_tier, enrolled_at, artifact_hash, record_json) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (enrollment_id, worker_id, species, capabilities, risk_tier, now,
                          artifact_hash, record_json))
            return Upsert(True, True, enrollment_id, now, None)
        return self.write(work)

    def enrollments(self):
        """Every enrollment, newest first."""
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT enrollment_id, worker_id, worker_species_id, capabilities, risk_tier, "
                "enrolled_at, artifact_hash, record_json "
                "FROM enrollments ORDER BY enrolled_at DESC, rowid DESC").fetchall()
        return [Enrollment(r[0], r[1], r[2], _json_list(r[3]), r[4], r[5], r[6],
                           _json_object(r[7])) for r in rows]

    def delete_enrollment(self, worker_id, audit):
        def work(conn):
            gone = conn.execute("DELETE FROM enrollments WHERE worker_id = ?",
                                (worker_id,)).rowcount == 1
            if gone:
                self._audit(conn, audit)
            return gone
        return self.write(work)

    # -- decisions -----------------------------------------------------------

    def insert_decision(self, row, consume_approval=None, then=None):
        """INSERT OR IGNORE one decision row (a dict): a repeated decision_id
        is ignored.  Returns its place in the evidence chain once stored,
        False if ignored (and passes the same to ``then``, see write).

        ``consume_approval`` = (approval_id, input_hash, now): the decision is
        stored only if that approval can be used up in the same transaction,
        so an approval admits exactly one decision.  Returns False if not."""
        values = [row.get(c) for c in CHAINED_COLUMNS["decisions"]]
        if consume_approval is None:
            return self.write(append=("decisions", values, entry_digest(values)), then=then)
        approval_id, input_hash, now = consume_approval

        def work(conn):
            used = conn.execute(
                "UPDATE approvals SET status = 'used', used_at = ?, used_decision_id = ? "
                "WHERE approval_id = ? AND status = 'approved' AND input_hash = ? "
                "AND expires_at > ?",
                (now, row["decision_id"], approval_id, input_hash, now)).rowcount
            if not used:
                return False
            return self._append(conn, "decisions", values)
        return self.write(work)

    def decision_events(self, places):
        """{place: the decision's /events data} of the decisions at these
        places in the evidence chain (at most 500: SQLite's bound on
        parameters), those still in the log, as it holds them.  Of an edited
        file: text that is not UTF-8 is read with U+FFFD in its place, rather
        than fail every client that reconnects, and a place two rows claim
        is the first one's."""
        columns = DECISION_COLUMNS + ("source", "chain_seq")
        with self.reading() as conn:
            conn.text_factory = _lenient_text
            try:
                rows = conn.execute("SELECT %s FROM decisions WHERE chain_seq IN (%s) "
                                    "ORDER BY rowid" % (", ".join(columns),
                                                        ", ".join("?" * len(places))),
                                    list(places)).fetchall()
            finally:
                conn.text_factory = str
        found = {}
        for row in rows:
            found.setdefault(row[-1], dict(zip(columns[:-1], row[:-1])))
        return found

    def decision(self, decision_id):
        """One decision-log row (the columns decision_row fills), or None."""
        columns = CHAINED_COLUMNS["decisions"]
        with self.reading() as conn:
            row = conn.execute("SELECT %s FROM decisions WHERE decision_id = ?"
                               % ", ".join(columns), (decision_id,)).fetchone()
        return dict(zip(columns, row)) if row else None

    def decisions_per_minute(self, since):
        """{"YYYY-MM-DDTHH:MM": (decisions, denials)} from ``since`` on."""
        with self.reading() as conn:
            rows = conn.execute("SELECT substr(decided_at, 1, 16), count(*), "
                                "sum(denied != 0) FROM decisions WHERE decided_at >= ? "
                                "GROUP BY 1", (since,)).fetchall()
        return {minute: (total, denied) for minute, total, denied in rows}

    def recent_decisions(self, limit):
        with self.reading() as conn:
            rows = conn.execute("SELECT %s FROM decisions ORDER BY decided_at DESC, rowid DESC "
                                "LIMIT ?" % ", ".join(DECISION_COLUMNS), (limit,)).fetchall()
        return [dict(zip(DECISION_COLUMNS, r)) for r in rows]

    def query_decisions(self, filters, after=None, limit=50, ascending=False):
        """Decisions matching ``filters`` (column -> value; ``since``/``until``
        bound decided_at), newest first (or oldest first), continuing after the
        position ``after`` = (decided_at, rowid).  Rows carry their rowid."""
        clauses, params = [], []
        for column in ("tenant_id", "capability_id", "env", "denied"):
            if filters.get(column) is not None:
                clauses.append("%s = ?" % column)
                params.append(filters[column])
        if filters.get("since"):
            clauses.append("decided_at >= ?")
            params.append(filters["since"])
        if filters.get("until"):
            clauses.append("decided_at < ?")
            params.append(filters["until"])
        if after is not None:
            clauses.append("(decided_at %s ? OR (decided_at = ? AND rowid %s ?))"
                           % ((">", ">") if ascending else ("<", "<")))
            params.extend([after[0], after[0], after[1]])
        order = "ASC" if ascending else "DESC"
        sql = "SELECT rowid, %s FROM decisions %s ORDER BY decided_at %s, rowid %s LIMIT ?" % (
            ", ".join(DECISION_COLUMNS), "WHERE " + " AND ".join(clauses) if clauses else "",
            order, order)
        with self.reading() as conn:
            rows = conn.execute(sql, params + [limit]).fetchall()
        return [(r[0], dict(zip(DECISION_COLUMNS, r[1:]))) for r in rows]

    def prune_decisions(self, before, audit, batch=5000):
        """Delete decisions decided before ``before``, a batch per transaction so
        writers are never held up for long.  Each batch writes, in the same
        transaction, an audit entry that counts the rows and vouches for the
        places they leave empty in the chain (so walk_chain can tell a pruned
        entry from a deleted one).  Only entries whose link still checks are
        pruned: a row that was edited, forged or never chained is kept for
        verify-log to report.  Returns (removed, kept)."""
        token_id, action, target, detail = audit
        kept, vouched = set(), {}               # rowids refused; pruned places
        columns = ", ".join(CHAINED_COLUMNS["decisions"])

        def work(conn):
            vouched.update(vouched_gaps(conn))  # another prune may have run meanwhile
            rows = [r for r in conn.execute(
                "SELECT rowid, chain_seq, chain_hash, %s FROM decisions WHERE decided_at < ? "
                "ORDER BY decided_at LIMIT ?" % columns, (before, batch + len(kept)))
                if r[0] not in kept][:batch]
            stored = {r[1]: r[2] for r in rows if isinstance(r[1], int)}
            sound = []
            for row in rows:
                seq = row[1]
                previous = isinstance(seq, int) and (
                    stored.get(seq - 1) or stored_link(conn, seq - 1, vouched))
                if previous and chain_link(previous, seq, "decisions",
                                           entry_digest(row[3:])) == row[2]:
                    sound.append(row)
                else:
                    kept.add(row[0])
            conn.executemany("DELETE FROM decisions WHERE rowid = ?", [(r[0],) for r in sound])
            if sound or not removed:            # an empty prune is audited too
                gaps = chain_runs((r[1], r[2]) for r in sound)
                for first, last, link in gaps:
                    vouched[first] = (last, link, None)     # (its entry: next)
                self._audit(conn, (token_id, action, target,
                                   dict(detail, removed=len(sound), gaps=gaps)))
            return len(rows), len(sound)
        removed = 0
        while True:
            selected, count = self.write(work)
            removed += count
            if selected < batch:
                return removed, len(kept)

    def count_by(self, table, column, where=""):
        with self.reading() as conn:
            return dict(conn.execute("SELECT %s, count(*) FROM %s %s GROUP BY %s"
                                     % (column, table, where, column)).fetchall())

    def decision_counts(self, day):
        """(total, today, denied today) from the per-day counts."""
        with self.reading() as conn:
            total = conn.execute("SELECT coalesce(sum(total), 0) FROM decision_days").fetchone()[0]
            today = conn.execute("SELECT total, denied FROM decision_days WHERE day = ?",
                                 (day,)).fetchone() or (0, 0)
        return total, today[0], today[1]

    # -- the evidence chain --------------------------------------------------

    def head_key_id(self):
        """The id of the key that signed the chain's head (None: not signed)."""
        with self.reading() as conn:
            row = conn.execute("SELECT head_mac FROM chain").fetchone()
        return str(row[0]).partition(":")[0] if row and row[0] else None

    def verify_chain(self, keys=None, max_problems=100):
        """Walk the chain in one read snapshot: see walk_chain."""
        with self.reading() as conn:
            conn.execute("BEGIN")
            try:
                return walk_chain(conn, keys, max_problems)
            finally:
                conn.execute("ROLLBACK")

    # -- alerts --------------------------------------------------------------

    def insert_alert(self, alert, then=None):
        values = [alert[c] for c in ALERT_COLUMNS]
        self.write(append=("alerts", values, entry_digest(values)), then=then)

    def recent_alerts(self, limit=50):
        with self.reading() as conn:
            rows = conn.execute("SELECT %s FROM alerts ORDER BY created_at DESC, rowid DESC "
                                "LIMIT ?" % ", ".join(ALERT_COLUMNS), (limit,)).fetchall()
        return [dict(zip(ALERT_COLUMNS, r)) for r in rows]

    # -- tokens --------------------------------------------------------------

    def insert_token(self, token_id, name, token_hash, scopes, tenant, audit):
        def work(conn):
            conn.execute("INSERT INTO tokens (token_id, name, token_hash, scopes, tenant, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (token_id, name, token_hash, " ".join(sorted(scopes)), tenant, now_iso()))
            self._audit(conn, audit)
        return self.write(work)

    def find_token(self, token_hash):
        with self.reading() as conn:
            row = conn.execute("SELECT token_id, name, token_hash, scopes, tenant FROM tokens "
                               "WHERE token_hash = ? AND revoked_at IS NULL",
                               (token_hash,)).fetchone()
        # The index found the row; compare once more in constant time anyway.
        if row and hmac.compare_digest(row[2], token_hash):
            return Token(row[0], row[1], frozenset(row[3].split()), row[4])
        return None

    def count_tokens(self):
        with self.reading() as conn:
            return conn.execute("SELECT count(*) FROM tokens WHERE revoked_at IS NULL"
                                ).fetchone()[0]

    def list_tokens(self):
        with self.reading() as conn:
            rows = conn.execute("SELECT %s FROM tokens ORDER BY created_at DESC"
                                % ", ".join(TOKEN_COLUMNS)).fetchall()
        return [dict(zip(TOKEN_COLUMNS, r), scopes=r[2].split()) for r in rows]

    def revoke_token(self, token_id, audit):
        def work(conn):
            done = conn.execute("UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND "
                                "revoked_at IS NULL", (now_iso(), token_id)).rowcount == 1
            if done:
                self._audit(conn, audit)
            return done
        return self.write(work)

    def touch_token(self, token_id, moment):
        self.defer(lambda conn: conn.execute("UPDATE tokens SET last_used_at = ? "
                                             "WHERE token_id = ?", (moment, token_id)))

    # -- settings ------------------------------------------------------------

    def settings(self):
        """Every stored setting, JSON-decoded: {key: value}."""
        with self.reading() as conn:
            rows = conn.execute("SELECT key, value FROM settings").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def put_setting(self, key, value, audit):
        """Store (or with value None, remove) a setting, audited in the same transaction."""
        def work(conn):
            if value is None:
                conn.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO settings (key, value, updated_at, "
                             "updated_by) VALUES (?, ?, ?, ?)",
                             (key, json.dumps(value), now_iso(), audit[0]))
            self._audit(conn, audit)
        return self.write(work)

    # -- bans ----------------------------------------------------------------

    def add_ban(self, sha256, reason, audit):
        def work(conn):
            added = conn.execute("INSERT OR IGNORE INTO bans (sha256, reason, created_at, "
                                 "created_by) VALUES (?, ?, ?, ?)",
                                 (sha256, reason, now_iso(), audit[0])).rowcount == 1
            if added:
                self._audit(conn, audit)
            return added
        return self.write(work)

    def remove_ban(self, sha256, audit):
        def work(conn):
            removed = conn.execute("DELETE FROM bans WHERE sha256 = ?", (sha256,)).rowcount == 1
            if removed:
                self._audit(conn, audit)
            return removed
        return self.write(work)

    def bans(self):
        with self.reading() as conn:
            rows = conn.execute("SELECT sha256, reason, created_at FROM bans "
                                "ORDER BY created_at DESC").fetchall()
        return [{"sha256": r[0], "reason": r[1], "created_at": r[2]} for r in rows]

    # -- approvals -----------------------------------------------------------

    def open_approval(self, row):
        """Open a pending approval, or return the pending one already open
        for the same input (a retrying client does not pile up approvals).
        Returns (approval_id, created)."""
        def work(conn):
            existing = conn.execute("SELECT approval_id FROM approvals WHERE input_hash = ? "
                                    "AND status = 'pending' AND expires_at > ?",
                                    (row["input_hash"], row["created_at"])).fetchone()
            if existing:
                return existing[0], False
            conn.execute("INSERT INTO approvals (%s) VALUES (%s)" % (
                ", ".join(row), ", ".join("?" * len(row))), list(row.values()))
            return row["approval_id"], True
        return self.write(work)

    def approval(self, approval_id, now):
        with self.reading() as conn:
            row = conn.execute("SELECT %s, %s FROM approvals WHERE approval_id = ?" % (
                ", ".join(APPROVAL_COLUMNS), APPROVAL_STATUS_SQL), (now, approval_id)).fetchone()
        if row is None:
            return None
        approval = dict(zip(APPROVAL_COLUMNS, row))
        approval["status"] = row[-1]
        return approval

    def approvals(self, status, now, limit=200):
        sql = "SELECT * FROM (SELECT %s, %s AS effective FROM approvals) " % (
            ", ".join(APPROVAL_COLUMNS), APPROVAL_STATUS_SQL)
        params = [now]
        if status:
            sql += "WHERE effective = ? "
            params.append(status)
        sql += "ORDER BY created_at DESC LIMIT ?"
        params.append(limit)
        with self.reading() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [dict(zip(APPROVAL_COLUMNS, r[:-1]), status=r[-1]) for r in rows]

    def decide_approval(self, approval_id, status, note, now, audit):
        """pending -> approved/rejected, only while unexpired; True if done."""
        def work(conn):
            done = conn.execute("UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, "
                                "decision_note = ? WHERE approval_id = ? AND status = 'pending' "
                                "AND expires_at > ?",
                                (status, now, audit[0], note, approval_id, now)).rowcount == 1
            if done:
                self._audit(conn, audit)
            return done
        return self.write(work)

    # -- audit trail -----------------------------------------------------------

    def audit_entries(self, limit=200):
        with self.reading() as conn:
            rows = conn.execute("SELECT %s FROM audit ORDER BY at DESC, rowid DESC LIMIT ?"
                                % ", ".join(AUDIT_COLUMNS), (limit,)).fetchall()
        return [dict(zip(AUDIT_COLUMNS, r[:-1]), detail=_json_object(r[-1])) for r in rows]




# -- the evidence chain -------------------------------------------------------
#
# Every decision, alert and audit entry is one link of a single hash chain in
# the order the hall wrote them: its chain_hash is SHA-256 over the previous
# link, its place (chain_seq), its table and the digest of its content.  Editing, deleting,
# inserting or reordering rows in the file breaks the chain where it was done;
# walk_chain names the place.  The head (seq, hash) is kept in the chain
# table -- note it somewhere else now and then, and even a rewrite of every
# later row and of the head shows.

APPEND_SQL = {table: "INSERT %sINTO %s (%s, chain_seq, chain_hash) VALUES (%s)" % (
    "OR IGNORE " if table == "decisions" else "", table, ", ".join(columns),
    ", ".join("?" * (len(columns) + 2))) for table, columns in CHAINED_COLUMNS.items()}
ENTRY_NAMES = {"decisions": "decision", "alerts": "alert", "audit": "audit entry"}
PRUNE_ACTION = "decisions.prune"
HEAD_REWRITTEN = "chain.head_rewritten"


def entry_digest(values):
    """SHA-256 of an entry's content: the JSON array of its CHAINED_COLUMNS
    values as stored.  (Computed by the request's own thread: the writer
    thread, which every write waits for, only links.)"""
    return hashlib.sha256(_COMPACT_JSON(list(values)).encode("utf-8")).hexdigest()


def _blob(value):
    """A blob as JSON: one the hall never writes -- an edit of the file can --
    still gets a digest, none a text can have, so the entry is reported as
    altered, never as a crash of the verifier."""
    if isinstance(value, bytes):
        return {"blob": value.hex()}
    raise TypeError("%s is not a stored value" % type(value).__name__)


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), default=_blob).encode


def chain_link(previous, seq, table, digest):
    """The chain hash of one entry: SHA-256 over the previous entry's chain
    hash, the entry's place, its table and its entry_digest.  No secret:
    anyone with the file can check it."""
    return hashlib.sha256(("%s\n%d\n%s\n%s" % (previous, seq, table, digest)
                           ).encode("utf-8")).hexdigest()


def head_mac(secret, key_id, seq, head, seal=None):
    """The MAC the hall keeps beside the chain's head: "key_id:hex".  It
    covers ``seal`` too -- (sealed_seq, sealed_at) as stored -- in a file
    of schema SEAL_SIGNED_FROM or later; None is the form before it."""
    message = "pyhall chain head\n%d\n%s" % (seq, head)
    if seal is not None:                        # (as JSON: 2 is not "2", nor null "None")
        message += "\nsealed\n" + _COMPACT_JSON(list(seal))
    return "%s:%s" % (key_id, hmac.new(secret, message.encode("utf-8"),
                                       hashlib.sha256).hexdigest())


def head_signed_by(keys, seq, head, mac, seal):
    """Is ``mac`` the head's MAC under one of ``keys`` ({key_id: secret})?"""
    key_id = str(mac).partition(":")[0]
    return key_id in keys and isinstance(seq, int) and hmac.compare_digest(
        head_mac(keys[key_id], key_id, seq, str(head), seal), str(mac))


def sign_the_seal(conn, store):
    """Migration 8: sign the head anew in the form that covers the seal --
    if this hall signed it as it is.  A head it did not sign is left as
    found, for the next write and verify-log to report: signing it now
    would vouch for the edit."""
    row = conn.execute("SELECT seq, head, head_mac, sealed_seq, sealed_at FROM chain"
                       ).fetchone()
    if row is None or store.keyring is None:
        return
    seq, head, mac, sealed_seq, sealed_at = row
    if head_signed_by(store.keyring.secrets(), seq, head, mac, None):
        conn.execute("UPDATE chain SET head_mac = ?",
                     (store.sign_head(seq, head, (sealed_seq, sealed_at)),))


def chain_runs(links):
    """[(seq, chain_hash)] -> [[first, last, hash of last]] for each run of
    consecutive places: what a prune leaves empty, and the link to go on from."""
    runs = []
    for seq, link in sorted(links):
        if runs and runs[-1][1] == seq - 1:
            runs[-1][1:] = [seq, link]
        else:
            runs.append([seq, seq, link])
    return runs


def _chained_rows(conn, table, key="rowid", chunk=2000):
    """(chain_seq, table, rowid, values, chain_hash) of a table's rows in
    ``key`` order -- "rowid" (as written) or "chain_seq" (as chained: only
    the rows whose place is an integer, what PLACED_SQL is not) -- read a
    chunk at a time: memory stays flat."""
    select = "SELECT chain_seq, rowid, %s, chain_hash FROM %s WHERE %s " % (
        ", ".join(CHAINED_COLUMNS[table]), table, PLACED_SQL if key == "chain_seq" else "1")
    order = " ORDER BY %s, rowid LIMIT %d" % (key, chunk)
    position = 1 if key == "rowid" else 0
    rows = conn.execute(select + order).fetchall()
    while rows:
        for row in rows:
            yield row[0], table, row[1], list(row[2:-1]), row[-1]
        if len(rows) < chunk:
            return
        rows = conn.execute(select + "AND (%s, rowid) > (?, ?)" % key + order,
                            (rows[-1][position], rows[-1][1])).fetchall()


# A row has a place in the chain when its chain_seq is an integer: not NULL,
# nor a text, a blob or a real (-1e19 sorts before any integer a range starts at).
PLACED_SQL = "typeof(chain_seq) = 'integer'"


def seal_existing_rows(conn, sign_head):
    """Migration 6: chain the rows written before the chain existed, each
    table in the order it was written, interleaved oldest first.  walk_chain
    reports them as sealed: the chain vouches for them from this moment on."""
    conn.execute("DROP TRIGGER audit_no_update")  # the audit rows get their place once
    def by_time(table):
        at = CHAINED_COLUMNS[table].index(CHAIN_TIME[table])
        for _seq, _table, rowid, values, _link in _chained_rows(conn, table):
            yield values[at], table, rowid, values
    seq, head = 0, CHAIN_GENESIS
    for _time, table, rowid, values in heapq.merge(*map(by_time, CHAINED_COLUMNS)):
        seq += 1
        head = chain_link(head, seq, table, entry_digest(values))
        conn.execute("UPDATE %s SET chain_seq = ?, chain_hash = ? WHERE rowid = ?" % table,
                     (seq, head, rowid))
    conn.execute(AUDIT_NO_UPDATE)
    conn.execute("INSERT INTO chain (id, seq, head, sealed_seq, sealed_at, head_mac) "
                 "VALUES (1, ?, ?, ?, ?, ?)",
                 (seq, head, seq, now_iso() if seq else None, sign_head(seq, head)))


def walk_chain(conn, keys=None, max_problems=100):
    """Check every link of the chain; a report with ``intact``, the number of
    entries, the head, what was pruned and sealed, and the problems found in
    chain order (at most ``max_problems``): an entry *altered* (its content
    or its place changed), entries *deleted*, an entry *inserted* outside the
    chain, or a *head* that does not match the last entry or (with ``keys``,
    {key_id: secret}) is not signed by the hall -- nor, with it, the seal.
    Text that is not UTF-8 (only an edit of the file makes it) is read as
    it is, to be reported as altered, not as a failure to read the file."""
    conn.text_factory = _exact_text
    try:
        return _walk_chain(conn, keys, max_problems)
    finally:
        conn.text_factory = str


def _exact_text(data):
    return data.decode("utf-8", "surrogateescape")


def _shown(value):
    """A stored value fit for a report and a terminal: bytes that are not
    UTF-8 and control characters are not shown."""
    return clean_id(str(value).encode("utf-8", "replace").decode("utf-8"))


def _walk_chain(conn, keys, max_problems):
    recorded_seq, recorded_head, sealed_seq, sealed_at, recorded_mac = conn.execute(
        "SELECT seq, head, sealed_seq, sealed_at, head_mac FROM chain").fetchone() or (
            None, None, 0, None, None)
    seal = (sealed_seq, sealed_at) if conn.execute("PRAGMA user_version").fetchone()[0] >= \
        SEAL_SIGNED_FROM else None              # (a file not migrated yet: the form before)
    if not isinstance(sealed_seq, int):
        sealed_seq = 0
    vouched = vouched_gaps(conn)
    in_order, unchained = [], []                # problems at a place (found in order), and not
    vouchers, sound_prunes = {}, set()          # prune entries a gap was taken on the word
    # of ({place of the entry: the gap}), and those that hold their place as chained

    def problem(kind, seq, message):
        found = unchained if seq is None else in_order
        if len(found) < max_problems:
            found.append({"problem": kind, "seq": seq, "message": message})

    def unplaced(table, entry_id):
        problem("inserted", None, "%s %s is not in the chain: it was written into the file "
                                  "directly" % (ENTRY_NAMES[table], _shown(entry_id)))

    def placed(table):
        """The table's rows in chain order; those with no (or no integer as)
        place are reported instead."""
        for (entry_id,) in conn.execute("SELECT %s FROM %s WHERE NOT %s LIMIT ?" % (
                CHAINED_COLUMNS[table][0], table, PLACED_SQL), (max_problems,)):
            unplaced(table, entry_id)
        return _chained_rows(conn, table, "chain_seq")

    expected, previous, entries, pruned, last_name = 1, CHAIN_GENESIS, 0, 0, "the start"
    walked = dict.fromkeys(CHAINED_COLUMNS, 0)
    for seq, table, _rowid, values, stored in heapq.merge(*map(placed, CHAINED_COLUMNS)):
        walked[table] += 1
        name = "%s %s" % (ENTRY_NAMES[table], _shown(values[0]))
        if table == "audit" and values[3] == HEAD_REWRITTEN:
            problem("head", seq, "at %s the hall found the chain's head rewritten (at place "
                    "%s): entries before it may have been deleted, or what it says was sealed "
                    "at migration changed" % (
                        _shown(values[1]), _shown(_json_object(values[5]).get("seq"))))
        if seq < expected:
            problem("inserted", seq, "%s claims place %d, which %s already holds"
                    % (name, seq, last_name))
            continue
        if seq > expected:
            reached, previous, used = _vouched_link(vouched, expected, seq)
            for voucher in used:
                vouchers.setdefault(voucher, (expected, reached - 1, last_name))
            pruned += reached - expected
            if reached < seq:                   # previous is None: the next link is unknown
                problem("deleted", reached, "%s missing (between %s and %s)" % (
                    "entry %d is" % reached if reached == seq - 1 else
                    "entries %d..%d are" % (reached, seq - 1), last_name, name))
        if previous is not None and \
                chain_link(previous, seq, table, entry_digest(values)) != stored:
            problem("altered", seq, "%s at place %d was altered: its content or its place is "
                                    "not what was chained%s" % (
                                        name, seq, " (an entry sealed at migration, %s)"
                                        % _shown(sealed_at) if seq <= sealed_seq else ""))
        elif table == "audit" and values[3] == PRUNE_ACTION:
            sound_prunes.add(seq)               # (or past a break already reported)
        previous, expected, last_name = stored, seq + 1, name
        entries += 1
    if isinstance(recorded_seq, int) and recorded_seq >= expected:
        problem("deleted", expected, "the newest entries %d..%d are missing (after %s)"
                % (expected, recorded_seq, last_name))
    elif recorded_seq != expected - 1 or (expected > 1 and recorded_head != previous):
        problem("head", expected - 1, "the recorded head (place %s, %s) does not match the "
                "last entry (%s at place %d)" % (recorded_seq, str(recorded_head)[:16],
                                                 last_name, expected - 1))
    for table, count in walked.items():         # rows an edited index or schema hides from
        (held,) = conn.execute("SELECT count(*) FROM %s NOT INDEXED WHERE %s"   # the walk
                               % (table, PLACED_SQL)).fetchone()
        if held != count:
            problem("inserted", None, "the %s table holds %d placed rows, but its chain_seq "
                    "index leads to %d: the file's schema or an index was edited (PRAGMA "
                    "integrity_check names it)" % (table, held, count))
    for voucher, (first, last, before) in sorted(vouchers.items()):
        if voucher not in sound_prunes:         # a prune entry forged, or edited after
            problem("deleted", first, "%s missing (after %s): the prune entry at place %d "
                    "that accounts for them is not as the hall chained it" % (
                        "entry %d is" % first if first == last else
                        "entries %d..%d are" % (first, last), before, voucher))
    in_order.sort(key=lambda found: found["seq"])
    head_signed = None
    if keys is not None:
        head_signed = head_signed_by(keys, recorded_seq, recorded_head, recorded_mac, seal)
        if not head_signed:
            problem("head", recorded_seq if isinstance(recorded_seq, int) else None,
                    "the recorded head is not signed with this hall's keys: the chain's head "
                    "was rewritten (newest entries may have been deleted)%s" % (
                        "" if seal is None else ", or what it says was sealed at migration"))
    problems = (in_order + unchained)[:max_problems]
    return {"head_signed": head_signed, "intact": not problems, "entries": entries,
            "length": expected - 1,
            # (an edited file can hold a head or a time that is not text: not reported as one)
            "head": (previous if isinstance(previous, str) else None) if expected > 1
            else CHAIN_GENESIS, "pruned": pruned,
            "sealed": {"entries": sealed_seq, "at": sealed_at if isinstance(sealed_at, str)
                       else None} if sealed_seq else None,
            "problems": problems, "first_problem": problems[0] if problems else None}


def vouched_gaps(conn):
    """{first pruned place: (last, link to go on from, place of the prune
    entry)}, as the prune audit entries in the chain record them: each
    before the entry that records it."""
    vouched = {}
    for voucher, detail in conn.execute("SELECT chain_seq, detail FROM audit WHERE action = ? "
                                        "AND " + PLACED_SQL, (PRUNE_ACTION,)):
        for run in _json_object(detail).get("gaps") or ():
            if isinstance(run, list) and len(run) == 3 and all(
                    type(v) is t for v, t in zip(run, (int, int, str))) and \
                    run[0] <= run[1] < voucher:
                vouched[run[0]] = (run[1], run[2], voucher)
    return vouched


def stored_link(conn, seq, vouched):
    """The chain hash recorded for place ``seq`` (by its row, or by a prune
    that emptied it), or None."""
    if seq == 0:
        return CHAIN_GENESIS
    for table in CHAINED_COLUMNS:
        row = conn.execute("SELECT chain_hash FROM %s WHERE chain_seq = ?" % table,
                           (seq,)).fetchone()
        if row:
            return row[0]
    for last, link, _voucher in vouched.values():
        if last == seq:
            return link
    return None


def _vouched_link(vouched, first, end):
    """How far the prune records account for the empty places first..end-1:
    (the first place not accounted for, or ``end``; the link to go on from,
    or None if the chain cannot be followed past the gap; the places of the
    prune entries taken on their word)."""
    link, used = None, []
    while first < end:
        run = vouched.get(first)
        if run is None or run[0] >= end:        # (a run ends at or after its first place)
            return first, None, used
        first, link = run[0] + 1, run[1]
        used.append(run[2])
    return first, link, used


# -- receipt keys ---------------------------------------------------------------

def log_signature(path, busy_timeout_ms=5000):
    """What the database at ``path`` says of its receipt key: "signed" (its
    chain head is signed: a missing key file is lost, not yet to be made),
    "unsigned" (new, or no key signed it yet: a key is to be made),
    "unchained" (tables but no evidence chain: a reference database, to be
    sealed -- or one whose chain was removed), or "refused" (a database
    this hall will not open: Store says why).  One
    that cannot be read now (locked, say) is refused here: whether a key
    signed it is not known."""
    if path == ":memory:":
        return "unsigned"
    if not os.path.exists(path):                # new: only if it can be made (where a
        # link that leads nowhere leads; a loop of links leads to no place at all)
        target = os.path.realpath(path)
        return "unsigned" if os.path.isdir(os.path.dirname(target)) and \
            not os.path.lexists(target) else "refused"
    if not os.path.isfile(path):
        return "refused"
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000.0)
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] > len(MIGRATIONS):
                return "refused"
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'chain'").fetchone():
                return "unchained" if conn.execute("SELECT 1 FROM sqlite_master").fetchone() \
                    else "unsigned"
            row = conn.execute("SELECT head_mac FROM chain").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError("cannot use database %s: %s" % (path, exc))
    return "signed" if row and row[0] else "unsigned"


class Keyring(object):
    """The secrets that sign decision receipts (HMAC-SHA256).  The newest
    key signs; every older one is kept so that receipts given out before a
    rotation still verify.  Stored as JSON beside the database, mode 0600,
    and re-read (at most once a second) when another process rotated it.

    ``keys`` only ever grows and is replaced whole (never changed in place),
    and ``current`` is set after it: a reader without the lock always finds
    the current key in the dict it reads."""

    def __init__(self, path, may_create=True):
        self.path = path
        self.keys, self.current = {}, None      # key_id -> {"secret": bytes, "created_at"}
        self._lock = threading.Lock()
        self._stamp, self._checked = None, 0.0
        if path is None:
            self.keys, self.current = self._with_new_key()
        elif not self._refresh() and not may_create:
            raise ConfigError(
                "receipt key file %s does not exist, but the database's log was signed "
                "with a key: set HALL_RECEIPT_KEYS to the hall's key file (a new key "
                "would make the log look tampered with)" % path)

    def signing_key(self):
        """(key_id, secret) of the key that signs now.  The first key is made
        (its file written) when first asked for, so that a start refused on
        the way leaves no key file behind."""
        if self.current is None:
            with self._lock:
                if self.current is None and not self._refresh():
                    self._save(*self._with_new_key(), create=True)
        elif self.path is not None and time.monotonic() - self._checked > 1.0:
            with self._lock:
                try:
                    self._refresh()
                except ConfigError as exc:      # keep signing with the keys already read
                    _complain("[hall-api] receipt keys not re-read: %s" % exc)
        current = self.current
        return current, self.keys[current]["secret"]

    def secrets(self):
        """{key_id: secret} of every key, to verify with (the file re-read
        first: a key another process made a moment ago counts)."""
        if self.path is not None:
            with self._lock:
                with contextlib.suppress(ConfigError):
                    self._refresh()
        return {key_id: key["secret"] for key_id, key in self.keys.items()}

    def secret(self, key_id):
        """One key's secret, or None if no key has that id."""
        key = self.keys.get(key_id)
        return key["secret"] if key else self.secrets().get(key_id)

    def listing(self):
        return [{"key_id": key_id, "created_at": key["created_at"],
                 "current": key_id == self.current} for key_id, key in self.keys.items()]

    def rotate(self):
        """Make a new signing key (the old ones still verify); its key_id.
        Other processes must be kept out meanwhile (Hall.rotate_receipt_key
        rotates inside a database write, which holds the file's write lock)."""
        with self._lock:
            if self.path is None:
                self.keys, self.current = self._with_new_key()
            else:
                self._refresh()
                self._save(*self._with_new_key())   # in use only once it is on disk
            return self.current

    def _with_new_key(self):
        """(the keys with a new one added, its key_id): nothing changed yet."""
        secret = secrets.token_bytes(32)
        key_id = receipt_key_id(secret)
        return dict(self.keys, **{key_id: {"secret": secret, "created_at": now_iso()}}), key_id

    def _refresh(self):
        """Read the file if it changed since last read; False if there is none."""
        self._checked = time.monotonic()
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ConfigError("receipt key file %s cannot be read: %s" % (self.path, exc))
        if (stat.st_mtime_ns, stat.st_size) == self._stamp:
            return True
        if os.name == "posix" and stat.st_mode & 0o077:
            raise ConfigError("receipt key file %s may be read by others (mode %o); "
                              "chmod 600 it" % (self.path, stat.st_mode & 0o777))
        try:
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
            keys = {entry["key_id"]: {"secret": bytes.fromhex(entry["secret"]),
                                      "created_at": entry["created_at"]}
                    for entry in document["keys"]}
            if document["current"] not in keys:
                raise KeyError("current")
            for key_id, key in keys.items():    # (a short or mislabelled secret is no key)
                if len(key["secret"]) < 16 or receipt_key_id(key["secret"]) != key_id:
                    raise ValueError("key %s is not the key its secret names" % key_id)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError("receipt key file %s cannot be used (%s: %s)"
                              % (self.path, type(exc).__name__, exc))
        self.keys, self.current, self._stamp = keys, document["current"], (
            stat.st_mtime_ns, stat.st_size)
        return True

    def _save(self, keys, current, create=False):
        """Write the file whole, 0600 from its first byte; a new file is
        linked into place only if none exists (two halls starting at once
        keep one key file)."""
        document = {"current": current, "keys": [
            {"key_id": key_id, "secret": key["secret"].hex(), "created_at": key["created_at"]}
            for key_id, key in keys.items()]}
        directory = os.path.dirname(self.path) or "."
        temporary = os.path.join(directory, ".%s.%s" % (os.path.basename(self.path),
                                                        secrets.token_hex(4)))
        try:
            self._write(document, temporary, create)
        except OSError as exc:
            raise ConfigError("cannot write receipt key file %s: %s" % (self.path, exc))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        self._refresh()

    def _write(self, document, temporary, create):
        """_save's file work (an OSError leaves the old file as it was)."""
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if create:
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                self._refresh()                 # another process made it first: use that
        else:
            os.replace(temporary, self.path)


def _lenient_text(data):
    return data.decode("utf-8", "replace")


def _json_list(text):
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _json_object(text):
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


###############################################################################
# 4. Rules and router
###############################################################################
#
# A rules document is {"rules": [{rule_id, match, decision}, ...]}; the first
# rule whose every condition holds decides.  A condition is an exact value,
# {"in": [...]} or {"any": true}; an absent key matches anything.

MATCH_KEYS = ("capability_id", "env", "data_label", "tenant_id", "tenant_risk", "qos_class")
VOCABULARY = {"env": ENVS, "data_label": DATA_LABELS, "tenant_risk": TENANT_RISKS,
              "qos_class": QOS_CLASSES}
RISK_ORDER = {"low": 0, "medium": 1, "high": 2, "critical": 3}

# Controls with a meaning to the pipeline itself.
CTRL_BLAST = "ctrl.blast_radius_scoring"
CTRL_ENVELOPE = "ctrl.privilege_envelopes_required"
_CONTROL_ID = re.compile(r"^ctrl\.[^\s]+$")


MAX_RULES = 1000                    # per document: shadow detection is quadratic


class RulesError(ValueError):
    """A rules or policy document that cannot be used, with the reason."""


def match_value(key, value):
    """The form a value is compared in: envs by their canonical name."""
    return ENV_ALIASES.get(value, value) if key == "env" else value


class Condition(object):
    """One match condition: a set of exact values and (for policy ids only)
    trailing-* prefixes.  ``None`` is used instead for "matches anything"."""

    __slots__ = ("values", "prefixes")

    def __init__(self, values, prefixes=()):
        self.values = frozenset(values)
        self.prefixes = tuple(prefixes)

    def matches(self, value):
        return value in self.values or (bool(self.prefixes) and value.startswith(self.prefixes))

    def covers(self, other):
        """True when every value ``other`` admits is admitted here too."""
        if other is None:
            return False
        if any(not any(p.startswith(q) for q in self.prefixes) for p in other.prefixes):
            return False
        return all(self.matches(v) for v in other.values)


def compile_conditions(match, where, prefix_keys=()):
    """A ``match`` object -> {key: Condition}; keys that match anything are left out."""
    if match is None:
        return {}
    if not isinstance(match, dict):
        raise RulesError("%s: match must be an object" % where)
    conditions = {}
    for key, spec in match.items():
        if key not in MATCH_KEYS:
            raise RulesError("%s: unknown match key %r (known: %s)"
                             % (where, key, ", ".join(MATCH_KEYS)))
        label = "%s: match.%s" % (where, key)
        if isinstance(spec, str):
            values = [spec]
        elif isinstance(spec, dict) and list(spec) == ["any"]:
            if spec["any"] is not True:
                raise RulesError('%s: {"any": ...} must be {"any": true}' % label)
            continue
        elif isinstance(spec, dict) and list(spec) == ["in"]:
            values = spec["in"]
            if not (isinstance(values, list) and values and
                    all(isinstance(v, str) for v in values)):
                raise RulesError('%s: {"in": [...]} needs a non-empty list of strings' % label)
        else:
            raise RulesError('%s must be a string, {"in": [...]} or {"any": true}' % label)
        exact, prefixes = [], []
        for value in values:
            if key in prefix_keys and value.endswith("*"):
                prefixes.append(value[:-1])
                continue
            if key in VOCABULARY and value not in VOCABULARY[key]:
                raise RulesError("%s: %r is not one of %s"
                                 % (label, value, ", ".join(VOCABULARY[key])))
            exact.append(match_value(key, value))
        conditions[key] = Condition(exact, prefixes)
    return conditions


def conditions_match(conditions, values):
    for key, condition in conditions.items():
        if not condition.matches(values[key]):
            return False
    return True


Candidate = namedtuple("Candidate", "worker_species_id score_hint")


class RankedCandidates(list):
    """A decision's candidate_workers_ranked, which also carries its JSON
    text (``json``): the same for every decision of one rule that chose the
    same candidate, so it is encoded once per rule (Rule.listed) and spliced
    into each answer (answer_json) instead of encoded again."""

    __slots__ = ("json",)

    def __init__(self, entries, json_text):
        list.__init__(self, entries)
        self.json = json_text


class Rule(object):
    """One compiled rule.  ``capability`` is set on auto rules: their workers
    must also declare the capability to be chosen."""

    __slots__ = ("rule_id", "conditions", "candidates", "controls", "profiles", "escalation",
                 "preconditions", "capability", "_listed_json")

    def __init__(self, rule_id, conditions, candidates, controls=(), profiles=(),
                 escalation=None, preconditions=None, capability=None):
        self.rule_id = rule_id
        self.conditions = conditions
        self.candidates = tuple(candidates)
        self.controls = tuple(sorted(set(controls)))
        self.profiles = list(profiles)
        self.escalation = dict(escalation or {})
        self.preconditions = preconditions if preconditions is not None else []
        self.capability = capability
        self._listed_json = {}                  # choice -> JSON of the listed candidates

    def listed(self, chosen):
        """The candidates a decision lists once the worker step chose the
        candidate at index ``chosen`` (None: none was available): the first
        MAX_LISTED_CANDIDATES -- the chosen one in the last place if it came
        later -- those before it "unavailable", those after "already_selected"."""
        shown = self.candidates[:MAX_LISTED_CANDIDATES]
        place = chosen
        if chosen is not None and chosen >= len(shown):
            shown, place = shown[:-1] + (self.candidates[chosen],), len(shown) - 1
        entries = [{"worker_species_id": c.worker_species_id, "score_hint": c.score_hint,
                    "skip_reason": ("unavailable" if place is None or index < place else
                                    None if index == place else "already_selected")}
                   for index, c in enumerate(shown)]
        text = self._listed_json.get(chosen)
        if text is None:
            text = _JSON(entries)
            if len(self._listed_json) < 4:      # (a rule is chosen from a few ways at most)
                self._listed_json[chosen] = text
        return RankedCandidates(entries, text)


class RuleSet(object):
    """An ordered list of rules; its shadowed pairs are found when first asked
    for (only prod and edge routes need them)."""

    def __init__(self, rules, source, shadowed=None):
        self.rules = list(rules)
        self.source = source                    # "request", "file" or "auto"
        self._shadowed = shadowed
        self._by_capability = None

    @property
    def shadowed(self):
        if self._shadowed is None:
            self._shadowed = find_shadowed(self.rules)
        return self._shadowed

    def first_match(self, values):
        if self.source == "auto":               # one rule per capability: a lookup
            if self._by_capability is None:
                self._by_capability = {r.capability: r for r in self.rules}
            rule = self._by_capability.get(values["capability_id"])
            return rule if rule and conditions_match(rule.conditions, values) else None
        for rule in self.rules:
            if conditions_match(rule.conditions, values):
                return rule
        return None


def find_shadowed(rules):
    """[(earlier_id, later_id)] where the earlier rule matches everything the
    later one does, so the later rule can never fire."""
    pairs = []
    for j, later in enumerate(rules):
        for earlier in rules[:j]:
            if all(key not in earlier.conditions or
                   earlier.conditions[key].covers(later.conditions.get(key))
                   for key in MATCH_KEYS):
                pairs.append((earlier.rule_id, later.rule_id))
                break
    return pairs


def _known_keys(value, known, where):
    """A misspelt key (``mach``, ``rulez``) would silently widen or void a
    rule: any key not known is refused."""
    unknown = sorted(set(value) - set(known) - {"description"})
    if unknown:
        raise RulesError("%s: unknown key %r (known: %s)" % (where, str(unknown[0])[:40],
                                                             ", ".join(known)))


def compile_rules(document, source="request"):
    """A rules document (parsed JSON) -> RuleSet, or RulesError with the reason."""
    if isinstance(document, dict):
        _known_keys(document, ("rules",), "the rules document")
        rules = document.get("rules")
    else:
        rules = document
    if not isinstance(rules, list):
        raise RulesError('a rules document is {"rules": [...]}')
    if len(rules) > MAX_RULES:
        raise RulesError("a rules document may hold at most %d rules" % MAX_RULES)
    compiled, seen = [], set()
    for index, rule in enumerate(rules):
        where = "rules[%d]" % index
        if not isinstance(rule, dict):
            raise RulesError("%s must be an object" % where)
        rule_id = rule.get("rule_id")
        if not isinstance(rule_id, str) or not rule_id.strip():
            raise RulesError("%s: rule_id must be a non-empty string" % where)
        where = "rule %r" % rule_id
        _known_keys(rule, ("rule_id", "match", "decision"), where)
        if rule_id in seen:
            raise RulesError("%s: rule_id is used twice" % where)
        seen.add(rule_id)
        conditions = compile_conditions(rule.get("match"), where)
        decision = rule.get("decision")
        if not isinstance(decision, dict):
            raise RulesError("%s: decision must be an object" % where)
        compiled.append(_compile_decision(rule_id, conditions, decision, where))
    return RuleSet(compiled, source)


def _compile_decision(rule_id, conditions, decision, where):
    ranked = decision.get("candidate_workers_ranked", [])
    if not isinstance(ranked, list):
        raise RulesError("%s: candidate_workers_ranked must be a list" % where)
    candidates = []
    for entry in ranked:
        if isinstance(entry, str):
            entry = {"worker_species_id": entry}
        species = entry.get("worker_species_id") if isinstance(entry, dict) else None
        if not isinstance(species, str) or not species:
            raise RulesError("%s: each candidate needs a worker_species_id string" % where)
        hint = entry.get("score_hint")
        if hint is not None and (isinstance(hint, bool) or not isinstance(hint, (int, float))):
            raise RulesError("%s: score_hint must be a number" % where)
        candidates.append(Candidate(species, hint))
    controls = decision.get("required_controls_suggested", [])
    if not (isinstance(controls, list) and all(isinstance(c, str) for c in controls)):
        raise RulesError("%s: required_controls_suggested must be a list of strings" % where)
    profiles = decision.get("recommended_profiles", [])
    if not isinstance(profiles, list):
        raise RulesError("%s: recommended_profiles must be a list" % where)
    escalation = decision.get("escalation", {})
    if not isinstance(escalation, dict):
        raise RulesError("%s: escalation must be an object" % where)
    for flag in ("policy_gate", "human_required_default"):
        if flag in escalation and not isinstance(escalation[flag], bool):
            raise RulesError("%s: escalation.%s must be true or false" % (where, flag))
    if "rationale" in escalation and not isinstance(escalation["rationale"], (str, type(None))):
        raise RulesError("%s: escalation.rationale must be a string" % where)
    preconditions = decision.get("preconditions", [])
    if not isinstance(preconditions, (list, dict)):
        raise RulesError("%s: preconditions must be a list or an object" % where)
    return Rule(rule_id, conditions, candidates, controls, profiles, escalation, preconditions)


def load_json_file(path, what):
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError("cannot read %s file %s: %s" % (what, path, exc.strerror or exc))
    try:
        return parse_json_body(raw, "the file")
    except HallError as exc:
        raise ConfigError("%s file %s: %s" % (what, path, exc.message))


def load_rules_file(path):
    try:
        return compile_rules(load_json_file(path, "rules"), source="file")
    except RulesError as exc:
        raise ConfigError("rules file %s: %s" % (path, exc))


# -- the operator policy gate ------------------------------------------------
#
# {"version": "2026-11", "default": "ALLOW",
#  "rules": [{"id": "prod-writes", "match": {"env": "prod", "capability_id": "cap.db.*"},
#             "outcome": "REQUIRE_HUMAN", "reason": "prod writes need a human"}]}

POLICY_OUTCOMES = ("ALLOW", "DENY", "REQUIRE_HUMAN")
PolicyVerdict = namedtuple("PolicyVerdict", "outcome reason rule_id version")


class Policy(object):
    """A compiled policy document: first matching rule wins, else the default."""

    def __init__(self, version, default, rules):
        self.version = version
        self.default = default
        self.rules = rules                      # [(id, conditions, outcome, reason)]

    def evaluate(self, values):
        values = dict(values, env=match_value("env", values.get("env")))  # staging is stage
        for rule_id, conditions, outcome, reason in self.rules:
            if conditions_match(conditions, values):
                return PolicyVerdict(outcome, reason, rule_id, self.version)
        return PolicyVerdict(self.default, "policy default", None, self.version)


def compile_policy(document):
    if not isinstance(document, dict):
        raise RulesError("a policy document must be a JSON object")
    _known_keys(document, ("version", "default", "rules"), "the policy document")
    version = document.get("version")
    if not isinstance(version, str) or not version.strip():
        raise RulesError("policy version must be a non-empty string")
    default = document.get("default")
    if default not in POLICY_OUTCOMES:
        raise RulesError("policy default must be one of %s" % ", ".join(POLICY_OUTCOMES))
    rules = document.get("rules", [])
    if not isinstance(rules, list):
        raise RulesError("policy rules must be a list")
    compiled, seen = [], set()
    for index, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise RulesError("policy rules[%d] must be an object" % index)
        rule_id = rule.get("id")
        if not isinstance(rule_id, str) or not rule_id.strip() or rule_id in seen:
            raise RulesError("policy rules[%d]: id must be a unique non-empty string" % index)
        seen.add(rule_id)
        where = "policy rule %r" % rule_id
        _known_keys(rule, ("id", "match", "outcome", "reason"), where)
        outcome = rule.get("outcome")
        if outcome not in POLICY_OUTCOMES:
            raise RulesError("%s: outcome must be one of %s" % (where, ", ".join(POLICY_OUTCOMES)))
        reason = rule.get("reason", "")
        if not isinstance(reason, str):
            raise RulesError("%s: reason must be a string" % where)
        conditions = compile_conditions(rule.get("match"), where,
                                        prefix_keys=("capability_id", "tenant_id"))
        compiled.append((rule_id, conditions, outcome, reason or "policy rule " + rule_id))
    return Policy(version, default, compiled)


def load_policy_file(path):
    try:
        return compile_policy(load_json_file(path, "policy"))
    except RulesError as exc:
        raise ConfigError("policy file %s: %s" % (path, exc))


def ask_policy(policy, values):
    """Run the gate; a policy may be a Policy or any callable (embedding).
    Whatever a callable returns that is not an outcome fails closed."""
    if isinstance(policy, Policy):
        return policy.evaluate(values)
    try:
        answer = policy(dict(values))
    except Exception as exc:                    # a broken gate must deny, not crash
        return PolicyVerdict(None, "policy gate raised %s" % type(exc).__name__, None, None)
    if isinstance(answer, PolicyVerdict):
        return answer
    if isinstance(answer, tuple) and len(answer) == 2:
        return PolicyVerdict(answer[0], str(answer[1]), None, None)
    return PolicyVerdict(answer, "", None, None)


# -- the registry snapshot ---------------------------------------------------

class Worker(namedtuple("Worker", "worker_id species capabilities risk_tier enrolled_at "
                                  "artifact_hash environments attestation envelope namespace")):
    """An enrolled worker as the router sees it.  ``environments`` is None
    when the worker did not declare allowed_environments (any env)."""

    def allows(self, env_key):
        return self.environments is None or env_key in self.environments

    def hashes(self):
        """The sha256 tags a ban can name: the record's and the code's."""
        code = (self.attestation or {}).get("code_hash")
        if not isinstance(code, str) or not code.strip():
            return (self.artifact_hash,)
        return (self.artifact_hash, _sha256_tag_of(code))  # as sent: any case, bare or tagged


class Registry(object):
    """An immutable snapshot of the enrolled workers, with what the router
    derives from them: the control sets, workers by species, auto rules.

    A worker with a ``namespace`` serves the tenants inside it only, and the
    controls it implements count for those tenants only: a namespace's own
    token enrolls such workers, and must not vouch for the rest of the hall."""

    def __init__(self, enrollments=(), version=None):
        self.version = version                  # the database's registry_version it reflects
        self._listing = None
        workers, controls, namespace_controls = [], set(), {}
        for e in enrollments:
            record = e.record
            namespace = worker_namespace(e.worker_id, record)
            implemented = record.get("currently_implements")
            if isinstance(implemented, list):
                (controls if namespace is None else namespace_controls.setdefault(
                    namespace, set())).update(c for c in implemented
                                              if isinstance(c, str) and _CONTROL_ID.match(c))
            workers.append(Worker(e.worker_id, e.worker_species_id, tuple(e.capabilities),
                                  e.risk_tier, e.enrolled_at, e.artifact_hash,
                                  _declared_environments(record),
                                  _object_or_none(record.get("attestation")),
                                  _object_or_none(record.get("privilege_envelope")),
                                  namespace))
        # Older enrollment first, so selection is stable and deterministic.
        self.newest_first = tuple(workers)      # as the store lists them
        workers.sort(key=lambda w: (w.enrolled_at, w.worker_id))
        self.workers = tuple(workers)
        self.controls = frozenset(controls)     # hall-wide
        self.namespace_controls = {namespace: frozenset(implemented) for namespace, implemented
                                   in namespace_controls.items() if implemented}
        self.by_species = {}
        self.by_id = {}
        for worker in self.workers:
            self.by_species.setdefault(worker.species, []).append(worker)
            self.by_id[worker.worker_id] = worker
        self.auto_rules = RuleSet(self._auto_rules(), "auto", shadowed=[])

    def controls_for(self, tenant_id):
        """The controls implemented for a tenant: hall-wide, and by the
        workers of each namespace the tenant is inside (org.a.team is
        inside org and org.a) -- one look-up per dot of its name."""
        if not self.namespace_controls:
            return self.controls
        found = set(self.controls)
        parts = tenant_id.split(".")
        for end in range(1, len(parts) + 1):
            found.update(self.namespace_controls.get(".".join(parts[:end]), ()))
        return found

    def listing(self):
        """The /workers answer: newest enrollment first."""
        workers = [{"worker_id": w.worker_id, "worker_species_id": w.species,
                    "capabilities": list(w.capabilities), "risk_tier": w.risk_tier,
                    "enrolled_at": w.enrolled_at, "status": "active"}
                   for w in self.newest_first]
        return {"workers": workers, "count": len(workers)}

    def listing_bytes(self):
        """The same, serialised once per snapshot."""
        if self._listing is None:
            self._listing = _JSON(self.listing()).encode("utf-8")
        return self._listing

    def _auto_rules(self):
        """Per capability: candidates are the species that serve it, lower
        risk tier first, then older enrollment; envs as the workers declare."""
        serving = {}
        for worker in self.workers:
            for capability in worker.capabilities:
                serving.setdefault(capability, []).append(worker)
        rules = []
        for capability in sorted(serving):
            workers = serving[capability]
            rank = {}
            for w in workers:
                key = (RISK_ORDER.get(w.risk_tier, len(RISK_ORDER)), w.enrolled_at, w.worker_id)
                rank[w.species] = min(rank.get(w.species, key), key)
            species = sorted(rank, key=rank.get)
            conditions = {"capability_id": Condition([capability])}
            if all(w.environments is not None for w in workers):
                conditions["env"] = Condition(set().union(*(w.environments for w in workers)))
            rules.append(Rule("auto." + capability, conditions,
                              [Candidate(s, None) for s in species], capability=capability))
        return rules


def _object_or_none(value):
    return value if isinstance(value, dict) else None


def worker_namespace(worker_id, record):
    """A worker's namespace: its record's ``namespace``, else None."""
    namespace = record.get("namespace")
    return namespace if isinstance(namespace, str) and namespace else None


def in_namespace(value, namespace):
    """True when ``value`` is the namespace or inside it (``org.a`` holds ``org.a.team``)."""
    return value == namespace or value.startswith(namespace + ".")


def _declared_environments(record):
    declared = record.get("allowed_environments")
    if declared is None:
        return None
    if not isinstance(declared, list):
        return frozenset()                      # unreadable declaration: allow nothing
    return frozenset(match_value("env", e) for e in declared if isinstance(e, str))


# -- the route input ---------------------------------------------------------

ROUTE_REQUIRED = ("capability_id", "env", "data_label", "tenant_id")
ROUTE_DEFAULTS = (("tenant_risk", "low"), ("qos_class", "P2"))
# What the artifact_hash covers: the request itself, not how it is traced or
# which rules or approval it is checked against.
HASHED_FIELDS = ("capability_id", "env", "data_label", "tenant_id", "tenant_risk",
                 "qos_class", "request", "blast_score")


def parse_route_input(body):
    """A /api/route body -> the normalised route input, or HallError(400)."""
    require_object(body)
    inp = {}
    for field in ROUTE_REQUIRED:
        if body.get(field) is None:
            raise HallError(400, "missing field: %s" % field)
        if not isinstance(body[field], str):
            raise HallError(400, "%s must be a string" % field)
        inp[field] = body[field]
    for field, default in ROUTE_DEFAULTS:
        inp[field] = _optional_string(body, field, default)
    for field, allowed in VOCABULARY.items():
        if inp[field] not in allowed:
            raise HallError(400, "%s must be one of: %s" % (field, ", ".join(allowed)))
    inp["correlation_id"] = _optional_string(body, "correlation_id") or (
        new_id() if body.get("correlation_id") is None else "")
    request = body.get("request")
    if request is not None and not isinstance(request, dict):
        raise HallError(400, "request must be an object")
    inp["request"] = request or {}
    blast = body.get("blast_score")
    if blast is not None and not _is_int(blast):
        raise HallError(400, "blast_score must be an integer from 0 to 100, or null")
    inp["blast_score"] = blast
    for flag in ("dry_run", "explain"):
        value = body.get(flag, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise HallError(400, "%s must be true or false" % flag)
        inp[flag] = value
    inp["approval_id"] = _optional_string(body, "approval_id")
    return inp


def route_input_hash(inp):
    hashed = {k: inp[k] for k in HASHED_FIELDS}
    if inp.get("worker_id"):                    # a request pinned to one worker instance
        hashed["worker_id"] = inp["worker_id"]
    return sha256_tag(canonical_json(hashed))


# -- the pure router ---------------------------------------------------------

class Floor(namedtuple("Floor", "safe_mode safe_mode_reason tenants banned hall_banned",
                       defaults=(False,))):
    """The hall-wide state checked before any rule: safe mode, the signatory
    tenants (None = any tenant), banned artifact hashes, and whether the
    running hall's own build is among them (then it routes nothing)."""


OPEN_FLOOR = Floor(False, None, None, frozenset())

DENY_MESSAGES = {
    "DENY_SAFE_MODE": "the hall is in safe mode; every route is denied",
    "DENY_HALL_BANNED": "this hall's build is on the ban list; every route is denied",
    "DENY_UNKNOWN_TENANT": "tenant is not among the hall's signatory tenants",
    "DENY_MISSING_TENANT_ID": "tenant_id is empty",
    "DENY_INVALID_INPUT": "blast_score must be between 0 and 100",
    "DENY_SHADOW_RULES_DETECTED": "the rule set has rules shadowed by earlier rules; "
                                  "refused in prod and edge",
    "DENY_NO_MATCHING_RULE": "no rule matches this request",
    "DENY_MISSING_CORRELATION_ID": "correlation_id is empty",
    "DENY_MISSING_REQUIRED_CONTROLS": "the registry lacks controls the rule requires",
    "DENY_REQUIRES_HUMAN": "blast score is too high for this environment without a human",
    "DENY_POLICY_GATE_UNCONFIGURED": "the rule requires a policy gate but none is configured",
    "DENY_POLICY_GATE": "the policy gate denied this request",
    "DENY_REQUIRES_HUMAN_APPROVAL": "the policy gate requires human approval",
    "DENY_POLICY_GATE_INVALID_RESPONSE": "the policy gate gave no valid outcome",
    "DENY_NO_AVAILABLE_WORKER": "no enrolled worker of a candidate species is available",
    "DENY_WORKER_ATTESTATION_MISSING": "the selected worker has no usable attestation",
    "DENY_WORKER_TAMPERED": "the selected worker's code does not match its attestation",
    "DENY_PRIVILEGE_ENVELOPE_VIOLATED": "the request exceeds the worker's privilege envelope",
    "DENY_APPROVAL_NOT_FOUND": "approval_id names no approval",
    "DENY_APPROVAL_PENDING": "the approval has not been decided yet",
    "DENY_APPROVAL_REJECTED": "the approval was rejected",
    "DENY_APPROVAL_EXPIRED": "the approval has expired",
    "DENY_APPROVAL_USED": "the approval has already been used",
    "DENY_APPROVAL_MISMATCH": "the approval was granted for a different request",
}
HUMAN_GATE_CODES = ("DENY_REQUIRES_HUMAN", "DENY_REQUIRES_HUMAN_APPROVAL")
APPROVAL_DENIALS = {"pending": "DENY_APPROVAL_PENDING", "rejected": "DENY_APPROVAL_REJECTED",
                    "expired": "DENY_APPROVAL_EXPIRED", "used": "DENY_APPROVAL_USED"}
DATA_LABEL_ORDER = {label: rank for rank, label in enumerate(DATA_LABELS)}
BLAST_HUMAN_THRESHOLD = 85
MAX_LISTED_CANDIDATES = 16          # candidates shown in a decision (all are considered)


class Denied(Exception):
    """Raised inside the pipeline: the first failing step decides."""

    def __init__(self, code, **detail):
        Exception.__init__(self, code)
        self.code = code
        self.detail = detail


def blast_score(inp):
    """The blast radius of a request, 0..100; (score, terms)."""
    terms = [("base", 10)]
    label_terms = {"INTERNAL": 20, "CONFIDENTIAL": 30, "RESTRICTED": 40, "SECRET": 50}
    if inp["data_label"] in label_terms:
        terms.append(("data_label", label_terms[inp["data_label"]]))
    if inp["env"] in HIGH_STAKES_ENVS:
        terms.append(("env", 15))
    if inp["qos_class"] == "P0":
        terms.append(("qos_class", 10))
    request = inp["request"]
    if request.get("egress") or request.get("external_call"):
        terms.append(("egress", 15))
    if request.get("writes") or request.get("mutates_state"):
        terms.append(("writes", 15))
    score = min(100, sum(value for _name, value in terms))
    caller = inp.get("blast_score")
    if caller is not None and caller > score:  # a caller may raise it, never lower it
        terms.append(("caller", caller - score))
        score = caller
    return score, terms


def decide(inp, rules, registry, policy=None, floor=OPEN_FLOOR, now=None, decision_id=None,
           approval=None, attestor=None, explain=False):
    """The router: a function of the route input (from ``parse_route_input``),
    a RuleSet, a Registry snapshot, a policy and the hall floor -- plus, when
    the caller presents one, the approval it names (a dict with approval_id,
    status, input_hash) and the attestor that checks worker code.  Returns the
    RouteDecision, with the short form of the /api/route client contract
    (allowed, worker_id, deny_reason) on top.  With ``explain`` it also
    carries a ``trace``: every step of the pipeline in order, with what it
    looked at and its outcome (pass, deny, skipped or not_reached).

    Every failure is a denial: nothing raises for any input."""
    try:
        input_hash = route_input_hash(inp)
    except (TypeError, ValueError, RecursionError):
        input_hash = None                       # a request JSON has no form for: denied
    decision = {
        "decision_id": decision_id or new_id(),
        "timestamp": now or now_iso(),
        "correlation_id": inp["correlation_id"],
        "tenant_id": inp["tenant_id"],
        "capability_id": inp["capability_id"],
        "matched_rule_id": None,
        "env": inp["env"],
        "data_label": inp["data_label"],
        "tenant_risk": inp["tenant_risk"],
        "qos_class": inp["qos_class"],
        "denied": False,
        "deny_reason_if_denied": None,
        "selected_worker_species_id": None,
        "selected_worker_id": None,
        "candidate_workers_ranked": [],
        "required_controls_effective": [],
        "escalation_effective": {"policy_gate": False, "human_required_default": False,
                                 "rationale": None},
        "preconditions_checked": {},
        # a caller's out-of-range score is never echoed or stored, whichever step denies
        "blast_score": inp["blast_score"] if 0 <= (inp["blast_score"] or 0) <= 100 else None,
        "artifact_hash": input_hash,
        "dry_run": bool(inp.get("dry_run")),
        "telemetry_envelopes": [],
    }
    events, trace = [], [] if explain else None
    try:
        _run_pipeline(inp, decision, events, rules, registry, policy, floor, approval,
                      attestor, trace)
    except Denied as denial:
        if trace:
            trace[-1].update(outcome="deny", deny_code=denial.code)
        detail = dict(denial.detail)
        message = detail.pop("message", None) or DENY_MESSAGES.get(denial.code, denial.code)
        decision["denied"] = True
        decision["deny_reason_if_denied"] = dict({"code": denial.code, "message": message},
                                                 **detail)
        decision["selected_worker_species_id"] = None
        decision["selected_worker_id"] = None
        if decision["matched_rule_id"] is None:
            decision["matched_rule_id"] = "NO_MATCH"
        events.append(("evt.os.task.denied", {"deny_code": denial.code}))
    else:
        events[0:0] = [("evt.os.task.routed", {}),
                       ("evt.os.worker.selected",
                        {"worker_species_id": decision["selected_worker_species_id"],
                         "worker_id": decision["selected_worker_id"]})]
    base = {"timestamp": decision["timestamp"], "decision_id": decision["decision_id"],
            "correlation_id": clean_id(decision["correlation_id"]),
            "tenant_id": clean_id(decision["tenant_id"]),
            "capability_id": clean_id(decision["capability_id"]),
            "matched_rule_id": clean_id(decision["matched_rule_id"])}
    decision["telemetry_envelopes"] = [_telemetry(base, name, extra) for name, extra in events]
    decision["allowed"] = not decision["denied"]
    decision["worker_id"] = decision["selected_worker_id"]
    reason = decision["deny_reason_if_denied"]
    decision["deny_reason"] = reason["code"] if reason else None
    if trace is not None:
        decision["trace"] = trace + [{"step": number, "name": name, "outcome": "not_reached"}
                                     for number, name in enumerate(PIPELINE_STEPS)
                                     if number >= len(trace)]
    return decision


# The steps of the pipeline, in order (the ``trace`` of an explained decision).
PIPELINE_STEPS = ("floor", "rule", "correlation_id", "required_controls", "blast_radius",
                  "policy_gate", "worker", "attestation", "privilege_envelope")


def _step(trace, name, **seen):
    """Open the trace entry of a pipeline step (outcome "pass" until a denial
    marks it); without a trace, a throwaway dict."""
    entry = {"step": PIPELINE_STEPS.index(name), "name": name, "outcome": "pass"}
    entry.update(seen)
    if trace is not None:
        trace.append(entry)
    return entry


def _explain_rules(rules, values):
    """Why each rule up to the first match did or did not match."""
    if rules.source == "auto":                  # one rule per capability: only it is tried
        tried = [r for r in rules.rules if r.capability == values["capability_id"]]
        if not tried:
            return {"rules": "auto", "tried": [], "note": "no enrolled worker declares "
                    "capability %s, so there is no auto rule for it" % values["capability_id"]}
    else:
        tried = []
        for rule in rules.rules:
            tried.append(rule)
            if conditions_match(rule.conditions, values):
                break
    shown = []
    for rule in tried[:50]:
        mismatches = [{"key": key, "value": values[key],
                       "expected": sorted(condition.values) + [p + "*" for p in
                                                               condition.prefixes]}
                      for key, condition in rule.conditions.items()
                      if not condition.matches(values[key])]
        shown.append({"rule_id": rule.rule_id, "matched": not mismatches,
                      "mismatches": mismatches})
    result = {"rules": rules.source, "tried": shown}
    if len(tried) > len(shown):
        result["more_tried"] = len(tried) - len(shown)
    return result


def unfit_reasons(worker, env_key, floor, capability, pinned, tenant_id):
    """Why an enrolled worker of a candidate species cannot take this request
    (empty: it can) -- the one test both the router and its trace use."""
    reasons = []
    if worker.namespace is not None and not in_namespace(tenant_id, worker.namespace):
        reasons.append("it serves namespace %s only" % worker.namespace)
    if not worker.allows(env_key):
        reasons.append("env %s is not among its allowed_environments" % env_key)
    if floor.banned.intersection(worker.hashes()):
        reasons.append("its artifact is banned")
    if capability is not None and capability not in worker.capabilities:
        reasons.append("it does not declare capability %s" % capability)
    if pinned is not None and worker.worker_id != pinned:
        reasons.append("the request is pinned to worker %s" % pinned)
    return reasons


def _explain_workers(rule, registry, env_key, floor, pinned, tenant_id):
    """Per candidate species, each enrolled worker and why it could not serve."""
    explained = []
    for candidate in rule.candidates[:MAX_LISTED_CANDIDATES]:
        workers = []
        for worker in registry.by_species.get(candidate.worker_species_id, ())[:10]:
            reasons = unfit_reasons(worker, env_key, floor, rule.capability, pinned,
                                    tenant_id)
            workers.append({"worker_id": worker.worker_id, "eligible": not reasons,
                            "reasons": reasons})
        explained.append({"worker_species_id": candidate.worker_species_id,
                          "workers": workers or "none enrolled"})
    return explained


def _telemetry(base, event_id, extra):
    """One telemetry envelope: the decision's ids (cleaned once) and the event's own fields."""
    envelope = dict(base, event_id=event_id)
    for key, value in extra.items():
        envelope[key] = clean_id(value) if isinstance(value, str) else value
    return envelope


def _run_pipeline(inp, decision, events, rules, registry, policy, floor, approval, attestor,
                  trace):
    values = {key: match_value(key, inp[key]) for key in MATCH_KEYS}
    env_key = values["env"]
    high_stakes = inp["env"] in HIGH_STAKES_ENVS
    checked = decision["preconditions_checked"]
    explain = trace is not None

    # 0. The hall floor: checked before any rule is read.
    if explain:
        _step(trace, "floor", safe_mode=floor.safe_mode, hall_build_banned=floor.hall_banned,
              signatory_tenants=sorted(floor.tenants) if floor.tenants is not None else "any",
              tenant_id=inp["tenant_id"], caller_blast_score=inp.get("blast_score"),
              high_stakes_env=high_stakes,
              shadowed_rules=rules.shadowed if high_stakes else "checked in prod and edge only")
    if floor.safe_mode:
        raise Denied("DENY_SAFE_MODE", safe_mode_reason=floor.safe_mode_reason)
    if floor.hall_banned:
        raise Denied("DENY_HALL_BANNED")
    if decision["artifact_hash"] is None:       # (only a Python caller can pass such a value)
        raise Denied("DENY_INVALID_INPUT", field="request")
    if floor.tenants is not None and inp["tenant_id"] not in floor.tenants:
        raise Denied("DENY_UNKNOWN_TENANT")
    if not inp["tenant_id"].strip():
        raise Denied("DENY_MISSING_TENANT_ID")
    caller_blast = inp.get("blast_score")
    if caller_blast is not None and not 0 <= caller_blast <= 100:
        raise Denied("DENY_INVALID_INPUT", field="blast_score")
    if high_stakes and rules.shadowed:
        raise Denied("DENY_SHADOW_RULES_DETECTED",
                     shadowed_rules=[later for _earlier, later in rules.shadowed],
                     shadowed_by={later: earlier for earlier, later in rules.shadowed})

    # 1. First matching rule; none fails closed.
    if explain:
        _step(trace, "rule", match_values=values, **_explain_rules(rules, values))
    rule = rules.first_match(values)
    if rule is None:
        raise Denied("DENY_NO_MATCHING_RULE")
    decision["matched_rule_id"] = rule.rule_id
    if rule.capability is not None and rule.candidates:
        # auto rules are named after the species they select (the first until then)
        decision["matched_rule_id"] = "%s.%s" % (rule.rule_id,
                                                 rule.candidates[0].worker_species_id)
    decision["candidate_workers_ranked"] = [
        {"worker_species_id": c.worker_species_id, "score_hint": c.score_hint}
        for c in rule.candidates[:MAX_LISTED_CANDIDATES]]
    decision["required_controls_effective"] = list(rule.controls)
    escalation = decision["escalation_effective"]
    escalation.update(rule.escalation)

    # 2. A correlation id to trace the work by.
    if explain:
        trace[-1].update(matched_rule_id=decision["matched_rule_id"],
                         candidates=[c.worker_species_id for c in
                                     rule.candidates[:MAX_LISTED_CANDIDATES]])
        _step(trace, "correlation_id", correlation_id=inp["correlation_id"])
    checked["correlation_id"] = bool(inp["correlation_id"].strip())
    if not checked["correlation_id"]:
        raise Denied("DENY_MISSING_CORRELATION_ID")

    # 3. Every required control is implemented in the registry (for this tenant).
    implemented = registry.controls_for(inp["tenant_id"]) if rule.controls else ()
    missing = [c for c in rule.controls if c not in implemented]
    if explain:
        _step(trace, "required_controls", required=list(rule.controls), missing=missing)
    checked["required_controls"] = not missing
    if missing:
        raise Denied("DENY_MISSING_REQUIRED_CONTROLS", missing_controls=missing)

    # 4. Blast radius.
    if explain:
        traced = _step(trace, "blast_radius", high_stakes_env=high_stakes,
                       rule_requires_scoring=CTRL_BLAST in rule.controls)
    if not (CTRL_BLAST in rule.controls or high_stakes):
        if explain:
            traced.update(outcome="skipped",
                          why="neither a prod/edge env nor a rule requiring " + CTRL_BLAST)
    else:
        score, terms = blast_score(inp)
        if explain:
            traced.update(score=score, terms=dict(terms), human_threshold=BLAST_HUMAN_THRESHOLD,
                          approval_presented=approval.get("approval_id") if approval else None)
        decision["blast_score"] = score
        events.append(("evt.gov.blast_scored", {"blast_score": score,
                                                "terms": dict(terms)}))
        checked["blast_radius"] = not (high_stakes and score >= BLAST_HUMAN_THRESHOLD)
        if not checked["blast_radius"]:
            escalation["human_required_default"] = True
            _human_gate(decision, approval, "DENY_REQUIRES_HUMAN", blast_score=score,
                        threshold=BLAST_HUMAN_THRESHOLD)

    # 5. The policy gate.
    if explain:
        traced = _step(trace, "policy_gate", configured=policy is not None,
                       rule_requires_gate=bool(rule.escalation.get("policy_gate")))
    verdict = None
    if policy is not None:
        verdict = ask_policy(policy, dict(values, env=inp["env"],
                                          blast_score=decision["blast_score"],
                                          request=inp["request"]))
        escalation["policy_gate"] = True
    elif escalation.get("policy_gate"):
        raise Denied("DENY_POLICY_GATE_UNCONFIGURED")
    events.append(("evt.os.policy.gated", {
        "outcome": verdict.outcome if verdict else "ALLOW",
        "policy_version": verdict.version if verdict else None,
        "policy_rule_id": verdict.rule_id if verdict else None}))
    if explain and verdict is None:
        traced.update(outcome="skipped", why="no policy gate is configured")
    if verdict is not None:
        if explain:
            traced.update(verdict=verdict.outcome, policy_rule_id=verdict.rule_id,
                         policy_version=verdict.version, reason=verdict.reason or None)
        checked["policy_gate"] = verdict.outcome
        detail = {"policy_rule_id": verdict.rule_id, "policy_version": verdict.version}
        if verdict.outcome == "DENY":
            raise Denied("DENY_POLICY_GATE", message=verdict.reason or None, **detail)
        if verdict.outcome == "REQUIRE_HUMAN":
            escalation["human_required_default"] = True
            _human_gate(decision, approval, "DENY_REQUIRES_HUMAN_APPROVAL",
                        message=verdict.reason or None, **detail)
        elif verdict.outcome != "ALLOW":
            raise Denied("DENY_POLICY_GATE_INVALID_RESPONSE", **detail)

    # 6. The first candidate species with an eligible worker.
    # A capability served by thousands of species must not make every answer
    # huge: all candidates are considered, the first MAX_LISTED_CANDIDATES
    # (and the chosen one) are listed.
    pinned = inp.get("worker_id")
    if explain:
        traced = _step(trace, "worker", pinned_worker_id=pinned,
                       candidates=_explain_workers(rule, registry, env_key, floor, pinned,
                                                   inp["tenant_id"]))
    chosen = chosen_index = None
    for index, candidate in enumerate(rule.candidates):
        for worker in registry.by_species.get(candidate.worker_species_id, ()):
            if not unfit_reasons(worker, env_key, floor, rule.capability, pinned,
                                 inp["tenant_id"]):
                chosen, chosen_index = worker, index
                break
        if chosen is not None:
            break
    decision["candidate_workers_ranked"] = rule.listed(chosen_index)
    if chosen is None:
        raise Denied("DENY_NO_AVAILABLE_WORKER")
    decision["selected_worker_species_id"] = chosen.species
    decision["selected_worker_id"] = chosen.worker_id
    if explain:
        traced.update(selected_worker_id=chosen.worker_id, selected_species=chosen.species)
    if rule.capability is not None:
        decision["matched_rule_id"] = "%s.%s" % (rule.rule_id, chosen.species)

    # 7. Worker attestation: the code on disk is the code that enrolled.
    required = attestor is not None and attestor.required
    if explain:
        _step(trace, "attestation", required=required, worker_id=chosen.worker_id,
              **({} if required else {"outcome": "skipped",
                                      "why": "the hall does not require attestation"}))
    if required:
        problem = attestor.check(chosen)
        checked["worker_attestation"] = problem is None
        if problem is not None:
            raise Denied(problem[0], message=problem[1], worker_id=chosen.worker_id)

    # 8. Privilege envelope: the request stays within what the worker may do.
    if explain:
        applies = CTRL_ENVELOPE in rule.controls
        _step(trace, "privilege_envelope", envelope=chosen.envelope,
              violations=envelope_violations(chosen.envelope, inp) if applies else [],
              **({} if applies else {"outcome": "skipped",
                                     "why": "the rule does not require %s" % CTRL_ENVELOPE}))
    if CTRL_ENVELOPE in rule.controls:
        violations = envelope_violations(chosen.envelope, inp)
        checked["privilege_envelope"] = not violations
        if violations:
            raise Denied("DENY_PRIVILEGE_ENVELOPE_VIOLATED", violations=violations,
                         worker_id=chosen.worker_id)


def _human_gate(decision, approval, code, **detail):
    """A human must approve this input.  With no approval presented the
    request is denied (the Hall opens a pending approval for it); with one,
    it passes only if that approval was granted for this very input and is
    neither used nor expired."""
    if approval is None:
        raise Denied(code, **detail)
    approval_id = approval.get("approval_id")
    status = approval.get("status")
    if status == "unknown":
        raise Denied("DENY_APPROVAL_NOT_FOUND", approval_id=approval_id)
    if approval.get("input_hash") != decision["artifact_hash"]:
        raise Denied("DENY_APPROVAL_MISMATCH", approval_id=approval_id)
    if status != "approved":
        raise Denied(APPROVAL_DENIALS.get(status, "DENY_APPROVAL_NOT_FOUND"),
                     approval_id=approval_id)
    decision["preconditions_checked"]["human_approval"] = approval_id


def envelope_violations(envelope, inp):
    """What a request asks beyond a worker's privilege_envelope (none declared:
    all of it).  A bound the envelope does not state is the narrowest: data
    labelled PUBLIC, no env, no egress, no writes."""
    if envelope is None:
        return ["the worker declares no privilege_envelope"]
    problem = check_envelope(envelope)          # (a record another program wrote, say)
    if problem:
        return [problem]
    violations = []
    ceiling = envelope.get("max_data_label", DATA_LABELS[0])
    if DATA_LABEL_ORDER[inp["data_label"]] > DATA_LABEL_ORDER[ceiling]:
        violations.append("data_label %s is above %s" % (inp["data_label"], ceiling))
    envs = envelope.get("envs", ())
    if match_value("env", inp["env"]) not in {match_value("env", e) for e in envs}:
        violations.append("env %s is not in %s" % (inp["env"], ", ".join(envs) or
                                                    "its envs (none stated)"))
    request = inp["request"]
    if (request.get("egress") or request.get("external_call")) and not envelope.get("egress"):
        violations.append("egress is not allowed")
    if (request.get("writes") or request.get("mutates_state")) and not envelope.get("writes"):
        violations.append("writes are not allowed")
    return violations


ENVELOPE_FIELDS = {"max_data_label": DATA_LABELS, "envs": ENVS, "egress": bool, "writes": bool}


def check_envelope(envelope):
    """Validate a privilege_envelope at enrollment; returns an error sentence or None."""
    if not isinstance(envelope, dict):
        return "privilege_envelope must be an object"
    for key, value in envelope.items():
        if key not in ENVELOPE_FIELDS:
            return "privilege_envelope: unknown key %r (known: %s)" % (
                key[:40], ", ".join(ENVELOPE_FIELDS))
        kind = ENVELOPE_FIELDS[key]
        if kind is bool and not isinstance(value, bool):
            return "privilege_envelope.%s must be true or false" % key
        if key == "max_data_label" and value not in DATA_LABELS:
            return "privilege_envelope.max_data_label must be one of " + ", ".join(DATA_LABELS)
        if key == "envs" and not (isinstance(value, list) and all(e in ENVS for e in value)):
            return "privilege_envelope.envs must be a list of: " + ", ".join(ENVS)
    return None


class Attestor(object):
    """Checks a worker's ``attestation`` ({code_hash, source_file}) against
    the live file.  Only files inside ``directories`` are ever read, so a
    worker record cannot make the hall hash arbitrary files.  Hashes are
    cached by what a stat says of the file, so a route costs one stat per
    check: its inode and its change time (ctime) too, which -- unlike the
    modification time -- no owner of the file can set back.  A file changed
    within the last RECENT_SECONDS is hashed again every time: a change in
    the same tick of the file system's clock would leave the stat as it was."""

    RECENT_SECONDS = 2

    def __init__(self, directories, required=True):
        self.directories = [os.path.realpath(d) for d in directories]
        self.required = required
        self._cache = {}
        self._lock = threading.Lock()

    def resolve(self, source_file):
        """The real path of an attested file if it lies inside an allowed directory."""
        if not isinstance(source_file, str) or not source_file or "\x00" in source_file:
            return None
        path = os.path.realpath(source_file)
        for directory in self.directories:
            if os.path.commonpath([directory, path]) == directory:
                return path
        return None

    def live_hash(self, path):
        try:
            info = os.stat(path)
            key = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                   info.st_ctime_ns)
            with self._lock:
                cached = self._cache.get(key)
            if cached is None:
                cached = file_sha256(path)
                if time.time() - info.st_ctime > self.RECENT_SECONDS:
                    with self._lock:
                        if len(self._cache) > 4096:
                            self._cache.clear()
                        self._cache[key] = cached
            return cached
        except (OSError, ValueError):
            return None

    def check(self, worker):
        """None when the worker's code is what it attested; else (deny code, message)."""
        attestation = worker.attestation or {}
        code_hash = attestation.get("code_hash")
        if not isinstance(code_hash, str) or not code_hash:
            return ("DENY_WORKER_ATTESTATION_MISSING", "the worker record has no "
                    "attestation.code_hash")
        path = self.resolve(attestation.get("source_file"))
        if path is None:
            return ("DENY_WORKER_ATTESTATION_MISSING", "attestation.source_file is missing or "
                    "outside the hall's attestation directories")
        live = self.live_hash(path)
        if live is None or not hmac.compare_digest(live.encode(), _sha256_tag_of(
                code_hash).encode("utf-8", "replace")):
            return ("DENY_WORKER_TAMPERED", "the worker's code does not match its attestation")
        return None


def _sha256_tag_of(value):
    """``sha256:<hex>`` for either that form or bare hex (lower-cased)."""
    value = value.strip().lower()
    return value if value.startswith("sha256:") else "sha256:" + value


###############################################################################
# 5. The Hall
###############################################################################

Principal = namedtuple("Principal", "token_id name scopes tenant")
TRUSTED = Principal("in-process", "in-process", ALL_SCOPES, None)   # embedding callers
ANONYMOUS = Principal(None, None, frozenset(), None)

MAX_RECORD_BYTES = 64 * 1024        # a worker record, as stored
ALERT_DEDUP_SECONDS = 60.0          # the same alert is stored at most once per window
ALERTS_PER_CODE = 20                # and no code more often than this per window
DENIAL_BURST = (20, 60.0)           # denials for one tenant or capability within seconds
LOGIN_FAILURE_BURST = (10, 60.0)    # failed logins from one address within seconds
TOKEN_TOUCH_SECONDS = 60.0          # how often last_used_at is written per token
TOKEN_RECHECK_SECONDS = 1.0         # how long a valid token is trusted before it is read again
APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired", "used")
_SHA256_HEX = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")


def normalise_sha256(value, field="sha256"):
    """``sha256:<64 hex>`` (or bare hex) -> ``sha256:<lower hex>``, else HallError(400)."""
    match = _SHA256_HEX.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise HallError(400, "%s must be 64 hex digits, optionally prefixed sha256:" % field)
    return "sha256:" + match.group(1).lower()


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "worker"


# -- receipts ----------------------------------------------------------------
#
# A receipt lets a worker (or an auditor) check that a RouteDecision came from
# this hall unaltered: an HMAC-SHA256, under a key of the hall's Keyring, over
# the canonical JSON (keys sorted, no spaces, ASCII) of the fields below plus
# the key_id -- every field of the RouteDecision but the candidate list and the
# telemetry (derived, and long).  A worker holding the key checks it offline with verify_receipt;
# one without asks POST /api/receipts/verify.

RECEIPT_FIELDS = ("decision_id", "timestamp", "correlation_id", "tenant_id", "capability_id",
                  "matched_rule_id", "env", "data_label", "tenant_risk", "qos_class", "denied",
                  "deny_reason_if_denied", "selected_worker_species_id", "selected_worker_id",
                  "required_controls_effective", "escalation_effective",
                  "preconditions_checked", "blast_score", "artifact_hash", "dry_run", "allowed",
                  "worker_id", "deny_reason")
RECEIPT_ALGORITHM = "HMAC-SHA256"


def receipt_key_id(secret):
    """A key's public name: derived from the secret, revealing nothing of it."""
    return "rk_" + hashlib.sha256(b"pyhall receipt key\n" + secret).hexdigest()[:16]


def _receipt_fields(decision, key_id):
    signed = {field: decision.get(field) for field in RECEIPT_FIELDS}
    signed["key_id"] = key_id
    return signed


def _receipt_mac(decision, key_id, secret):
    return hmac.digest(secret, canonical_json(_receipt_fields(decision, key_id)).encode("utf-8"),
                       "sha256").hex()


def sign_receipt(decision, key_id, secret):
    """The ``receipt`` a RouteDecision carries."""
    return {"alg": RECEIPT_ALGORITHM, "key_id": key_id,
            "signed_fields": list(RECEIPT_FIELDS) + ["key_id"],
            "mac": _receipt_mac(decision, key_id, secret)}


def check_receipt(decision, keys):
    """(valid, why) for a decision (parsed JSON, as the hall answered it)
    against ``keys`` = {key_id: secret}."""
    if not isinstance(decision, dict):
        return False, "a decision is a JSON object"
    receipt = decision.get("receipt")
    if not isinstance(receipt, dict):
        return False, "the decision carries no receipt"
    key_id, mac = receipt.get("key_id"), receipt.get("mac")
    if receipt.get("alg") != RECEIPT_ALGORITHM or not isinstance(key_id, str) \
            or not isinstance(mac, str):
        return False, "the receipt is not an %s receipt of this hall" % RECEIPT_ALGORITHM
    missing = [field for field in RECEIPT_FIELDS if field not in decision]
    if missing:                                 # (signed as null: dropping it is a change)
        return False, "the decision lacks signed field %s" % missing[0]
    secret = keys.get(key_id)
    if secret is None:
        return False, "the receipt names key %s, which is not among the keys given" % (
            clean_id(key_id)[:40])
    try:
        expected = _receipt_mac(decision, key_id, secret)
    except (TypeError, ValueError, RecursionError):     # (a Python caller's value JSON
        return False, "a signed field of the decision is not a JSON value"  # has no form for)
    if not hmac.compare_digest(expected.encode(), mac.encode("utf-8", "replace")):
        return False, ("the receipt does not match: a signed field of the decision was "
                       "changed, or the receipt was not made with this key")
    return True, "signed by key %s" % key_id


def verify_receipt(decision, key):
    """True when ``decision`` -- a RouteDecision as the hall answered it,
    parsed from JSON -- carries a receipt made with ``key`` and none of its
    signed fields has changed.  ``key`` is a secret as bytes or as the hex
    that ``python hall.py receipt-key show`` prints, or {key_id: secret}
    for several keys."""
    if isinstance(key, dict):
        keys = {key_id: _secret_bytes(secret) for key_id, secret in key.items()}
    else:
        secret = _secret_bytes(key)
        keys = {receipt_key_id(secret): secret}
    return check_receipt(decision, keys)[0]


def _secret_bytes(secret):
    if isinstance(secret, str):
        return bytes.fromhex(secret)            # ValueError: not a key
    if isinstance(secret, (bytes, bytearray)):
        return bytes(secret)
    raise TypeError("a receipt key is bytes or a hex string")


# -- prepared decisions ------------------------------------------------------
#
# Most route requests repeat: an agent asks again for the same capability,
# tenant, env and data, and only its correlation id differs.  Their decision
# is a function of that input and of what decide() reads -- rules, registry
# snapshot, policy, floor -- each of which the hall replaces, never changes.
# So an allowed decision is made once per input and state, and each repeat
# takes it with its own ids and time filled in: the dict, the canonical text
# its receipt signs and the answer's JSON, all three.

class JSONTemplate(object):
    """JSON text with holes: the encoding of a value that held a marker
    string wherever a hole is, kept as a %-format with a named field at
    each.  A marker is a random token the hall made, so no caller's string
    is one."""

    __slots__ = ("format",)

    def __init__(self, text, markers):
        by_text = {_JSON_STRING(marker): hole for hole, marker in markers.items()}
        pieces = re.split("(%s)" % "|".join(map(re.escape, by_text)), text)
        # (re.split with a group: the text between markers at even places, markers at odd)
        self.format = "".join("%%(%s)s" % by_text[piece] if index % 2 else
                              piece.replace("%", "%%") for index, piece in enumerate(pieces))

    def fill(self, encoded):
        """The text with each hole replaced by ``encoded[hole]`` (JSON text)."""
        return self.format % encoded


class PreparedDecision(dict):
    """A RouteDecision taken from a prepared one; ``json`` is its answer's
    JSON text, made with it: answer_json sends that text, whatever is done
    to the dict afterwards."""

    __slots__ = ("json",)


_KEYED_FIELDS = tuple(f for f in HASHED_FIELDS if f != "request") + ("worker_id",)


class PreparedDecisions(object):
    """The allowed decisions prepared for the inputs seen under the current
    state.  Only what is sure to decide the same way is prepared: no dry
    run, explanation or approval, a correlation id telemetry shows as sent,
    a compiled policy (a callable one may answer differently each time) and
    no attestation (worker code is read at each request).  A prepared
    decision is checked, once, against the decision it was made beside:
    one that would differ in anything is not kept."""

    LIMIT = 512                                 # inputs noted or prepared (then: start over)
    MAX_KEY = 1024                              # characters: a longer input is not noted,
    MAX_ANSWER = 8192                           # nor one whose answer is longer prepared
    HOLES = ("decision_id", "timestamp", "correlation_id", "mac")

    def __init__(self):
        self._markers = {hole: "hole-%s-%s" % (hole, secrets.token_hex(16))
                         for hole in self.HOLES}
        self._current = ((), {})                # (state and signing key, its table)

    def __len__(self):
        """How many inputs have a decision prepared under the current state."""
        return sum(1 for prepared in list(self._current[1].values()) if prepared)

    @staticmethod
    def applies(inp, policy, attestor):
        """Whether a decision for ``inp`` may be taken from, or kept as, a
        prepared one."""
        cid = inp["correlation_id"]
        return not (inp["dry_run"] or inp["explain"] or inp["approval_id"] is not None
                    or not cid.strip() or clean_id(cid) != cid
                    or (attestor is not None and attestor.required)
                    or not (policy is None or isinstance(policy, Policy)))

    def _table(self, state):
        """The decisions prepared under ``state``: a new table when it is not
        the current one's.  (Tables are replaced whole, so a decision
        prepared under an older state is never found under a newer one.)"""
        current, table = self._current
        if len(current) != len(state) or any(a is not b for a, b in zip(current, state)):
            table = {}
            self._current = (state, table)
        elif len(table) >= self.LIMIT:
            table.clear()
        return table

    def take(self, inp, state, now, signing_key):
        """The decision for ``inp`` under ``state`` = (rules, registry,
        policy, floor), signed with ``signing_key``, if one is prepared;
        else None."""
        key = self._key(inp)
        prepared = key and self._table(state + signing_key).get(key)
        if not prepared:
            return None
        return self._fill(prepared, new_id(), now, inp["correlation_id"], signing_key)

    def prepare(self, inp, state, decision, signing_key):
        """After ``decision`` (signed) was made for ``inp`` under ``state``
        by decide(): keep it for the inputs that repeat it -- from the
        second time an input is seen, so that inputs that never repeat cost
        no more than a note that they were seen."""
        key = self._key(inp)
        if not decision["allowed"] or key is None or \
                sum(len(part) for part in key if isinstance(part, str)) > self.MAX_KEY:
            return
        table = self._table(state + signing_key)
        if key not in table:
            table[key] = None
            return
        rules, registry, policy, floor = state
        marks = self._markers
        template = decide(dict(inp, correlation_id=marks["correlation_id"]), rules, registry,
                          policy, floor, now=marks["timestamp"],
                          decision_id=marks["decision_id"])
        template["receipt"] = dict(sign_receipt(template, *signing_key), mac=marks["mac"])
        answer = answer_json(template)
        if len(answer) > self.MAX_ANSWER:
            return
        copied = tuple((field, _copier(value)) for field, value in template.items()
                       if isinstance(value, (dict, list)))
        prepared = (template, copied,
                    JSONTemplate(canonical_json(_receipt_fields(template, signing_key[0])),
                                 marks),
                    JSONTemplate(answer, marks))
        made = self._fill(prepared, decision["decision_id"], decision["timestamp"],
                          decision["correlation_id"], signing_key)
        if made == decision and made.json == answer_json(decision):
            table[key] = prepared

    @staticmethod
    def _key(inp):
        """What of an input its decision depends on (the fields its hash
        covers, the worker it is pinned to), cheaper to make than that hash."""
        request = inp["request"]
        try:
            return tuple(map(inp.__getitem__, _KEYED_FIELDS)) + (
                canonical_json(request) if request else None,)
        except (TypeError, ValueError, RecursionError):   # (a Python caller's value JSON
            return None                                   # has no form for: decide denies)

    @staticmethod
    def _fill(prepared, decision_id, timestamp, correlation_id, signing_key):
        """A new decision from a prepared one: its own copy, ids, time and MAC."""
        template, copied, signed, answer = prepared
        decision = PreparedDecision(template)
        for key, copy in copied:                # its own lists and dicts, all the way down
            decision[key] = copy(template[key])
        fields = {"decision_id": decision_id, "timestamp": timestamp,
                  "correlation_id": correlation_id}
        decision.update(fields)
        for envelope in decision["telemetry_envelopes"]:
            envelope.update(fields)
        encoded = {hole: _JSON_STRING(value) for hole, value in fields.items()}
        mac = hmac.digest(signing_key[1], signed.fill(encoded).encode("utf-8"), "sha256").hex()
        decision["receipt"]["mac"] = mac
        encoded["mac"] = '"%s"' % mac
        decision.json = answer.fill(encoded)
        return decision


def _copier(value):
    """A function that copies a JSON value shaped like ``value`` -- the
    same containers at the same places -- with its lists and dicts copied
    all the way down (strings and numbers cannot change: they are shared).
    Made once per shape, it copies with no look at what is not a container."""
    if type(value) is RankedCandidates:         # (its entries are flat; its JSON is kept)
        return lambda original: RankedCandidates(list(map(dict, original)), original.json)
    if isinstance(value, dict):
        inner = {key: _copier(item) for key, item in value.items()
                 if isinstance(item, (dict, list))}
        if not inner:
            return dict

        def copy_dict(original):
            copied = dict(original)
            for key, copy in inner.items():
                copied[key] = copy(copied[key])
            return copied
        return copy_dict
    if isinstance(value, list):
        if not any(isinstance(item, (dict, list)) for item in value):
            return list
        copies = [_copier(item) for item in value]
        return lambda original: [copy(item) for copy, item in zip(copies, original)]
    return lambda original: original


class BurstCounter(object):
    """Says when one key has been hit ``threshold`` times within ``window``
    seconds.  Memory stays bounded however many distinct keys arrive."""

    def __init__(self, threshold, window, max_keys=10000):
        self.threshold, self.window, self.max_keys = threshold, window, max_keys
        self._hits = {}
        self._lock = threading.Lock()

    def hit(self, key):
        moment = time.monotonic()
        with self._lock:
            if key not in self._hits and len(self._hits) >= self.max_keys:
                self._hits = {k: q for k, q in self._hits.items()
                              if q and moment - q[-1] < self.window}
                if len(self._hits) >= self.max_keys:
                    self._hits.clear()
            recent = self._hits.setdefault(key, [])
            recent.append(moment)
            del recent[:-self.threshold]
            return len(recent) >= self.threshold and moment - recent[0] <= self.window


class EventBus(object):
    """The live feed behind /events: recent events kept with increasing ids
    (so a client reconnecting with Last-Event-ID misses nothing still
    retained), and one bounded queue per subscriber -- a reader too slow to
    keep up is dropped rather than allowed to grow memory.

    A decision, nearly every event there is, is kept by its place in the
    evidence chain alone (two arrays of integers) and read back from the log
    for a client that reconnects.  Kept as a dict and its strings for the
    few seconds ten thousand decisions last under load, each one made route
    requests cost a tenth more processor time, measured: objects that die
    old rather than young leave the interpreter's memory colder in cache."""

    def __init__(self, retain=10000, per_subscriber=1000, read_decisions=None):
        self._retain = retain
        self._events = collections.deque(maxlen=retain)    # (id, kind, data) of the others
        self._decision_ids = array.array("q")               # ... and of the decisions,
        self._decision_places = array.array("q")            # their places in the chain
        self._read_decisions = read_decisions               # places -> {place: data}
        # Ids keep increasing across restarts: one a microsecond, never used up.
        self._next_id = int(time.time() * 1000000)
        self._subscribers = set()
        self._per_subscriber = per_subscriber
        self._lock = threading.Lock()

    def publish(self, kind, data, place=None):
        """``place``: the event is a decision the log holds at this place in
        the evidence chain (Store.decision_events reads it back)."""
        with self._lock:
            event = (self._next_id, kind, data)
            self._next_id += 1
            if not place or self._read_decisions is None:
                self._events.append(event)
            else:
                self._decision_ids.append(event[0])
                self._decision_places.append(place)
                if len(self._decision_ids) >= 2 * self._retain:     # (cut now and then)
                    del self._decision_ids[:-self._retain]
                    del self._decision_places[:-self._retain]
            for subscriber in list(self._subscribers):
                if not subscriber.offer(event):
                    self._subscribers.discard(subscriber)

    def subscribe(self, last_id, accept, decisions=True):
        """A Subscription fed with the events that ``accept`` takes: the retained
        ones after ``last_id`` (none when it is None), then each new one.
        ``decisions=False``: it takes no decision (none is read back)."""
        subscriber = Subscription(self._per_subscriber, accept)
        with self._lock:
            # What it missed, and from here on every new event: the decisions
            # it missed are read from the log outside the lock.
            missed, ids, places = [], (), ()
            if last_id is not None:
                missed = [event for event in self._events if event[0] > last_id]
                if decisions:
                    start = bisect.bisect_right(self._decision_ids, last_id)
                    ids, places = self._decision_ids[start:], self._decision_places[start:]
            self._subscribers.add(subscriber)
        try:
            missed = [event for event in missed if accept(event)]
            missed += self._read_back(ids, places, accept, self._per_subscriber + 1)
        except BaseException:                   # (a busy database: a 503)
            self.unsubscribe(subscriber)
            raise
        missed.sort(key=lambda event: event[0])
        with self._lock:
            if not subscriber.replay(missed):
                self._subscribers.discard(subscriber)
        return subscriber

    def _read_back(self, ids, places, accept, enough):
        """The decisions with these event ids and places that ``accept``
        takes, read from the log in order, a chunk at a time, until there are
        ``enough`` (more than a subscriber may be sent)."""
        taken = []
        for start in range(0, len(places), 500):
            chunk = places[start:start + 500]
            read = self._read_decisions(chunk)
            for event_id, place in zip(ids[start:start + 500], chunk):
                event = (event_id, "decision", read.get(place))
                if event[2] is not None and accept(event):
                    taken.append(event)
            if len(taken) >= enough:
                break
        return taken

    def unsubscribe(self, subscriber):
        with self._lock:
            self._subscribers.discard(subscriber)

    @property
    def subscribers(self):
        return len(self._subscribers)


class Subscription(object):
    def __init__(self, size, accept):
        self.queue = queue.Queue(maxsize=size)
        self.missed = []                        # sent before anything in the queue
        self.accept = accept
        self.dropped = False

    def offer(self, event):
        if self.dropped or not self.accept(event):
            return not self.dropped
        try:
            self.queue.put_nowait(event)
            return True
        except queue.Full:
            self.dropped = True
            return False

    def replay(self, missed):
        """The events it missed, which it takes (false if too many: dropped,
        and nothing new is sent after them)."""
        self.missed = missed[:self.queue.maxsize]
        if len(missed) > self.queue.maxsize:
            self.dropped = True
            with contextlib.suppress(queue.Empty):
                while True:
                    self.queue.get_nowait()
        return not self.dropped


class Metrics(object):
    """Counters and a latency histogram for /metrics (since this start)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self):
        self.counters = collections.Counter()   # (name, labels tuple) -> count
        self.latency = {}                       # labels -> [count per bucket..., sum, count]
        self._lock = threading.Lock()

    def count(self, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] += 1

    def observe_request(self, route, method, status, seconds):
        labels = (("method", method), ("route", route), ("status", str(status)))
        with self._lock:
            self.counters[("hall_http_requests_total", labels)] += 1
            series = self.latency.get(labels[:2])
            if series is None:
                series = self.latency[labels[:2]] = [0] * (len(self.BUCKETS) + 2)
            bucket = bisect.bisect_left(self.BUCKETS, seconds)     # the first bound >= it
            if bucket < len(self.BUCKETS):
                series[bucket] += 1
            series[-2] += seconds
            series[-1] += 1


HELP = {
    "hall_route_decisions_total": ("counter", "Route decisions made, by outcome and deny code."),
    "hall_ingested_decisions_total": ("counter", "Decisions recorded through /decisions/ingest."),
    "hall_enrollments_total": ("counter", "Enrollment requests, by result."),
    "hall_http_requests_total": ("counter", "HTTP requests, by route, method and status."),
    "hall_http_request_duration_seconds": ("histogram", "HTTP request latency, by route."),
    "hall_workers_enrolled": ("gauge", "Workers in the registry."),
    "hall_alerts": ("gauge", "Alerts stored, by level."),
    "hall_approvals_pending": ("gauge", "Human approvals waiting for a decision."),
    "hall_safe_mode": ("gauge", "1 while safe mode is on."),
    "hall_database_bytes": ("gauge", "Size of the SQLite database file."),
    "hall_wal_bytes": ("gauge", "Size of the SQLite write-ahead log."),
    "hall_uptime_seconds": ("gauge", "Seconds since this hall started."),
    "hall_event_subscribers": ("gauge", "Clients reading /events."),
    "hall_build_info": ("gauge", "The running build: version and sha256 of hall.py."),
}


def prometheus_escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(samples):
    """[(name, labels tuple, value)] -> the text exposition format, grouped by name."""
    lines, seen = [], set()
    for name, labels, value in samples:
        family = name[:-len("_bucket")] if name.endswith("_bucket") else name
        for suffix in ("_sum", "_count"):
            if family.endswith(suffix) and family[:-len(suffix)] in HELP:
                family = family[:-len(suffix)]
        if family not in seen:
            seen.add(family)
            kind, text = HELP[family]
            lines.append("# HELP %s %s" % (family, text))
            lines.append("# TYPE %s %s" % (family, kind))
        rendered = ",".join('%s="%s"' % (k, prometheus_escape(v)) for k, v in labels)
        lines.append("%s%s %s" % (name, "{%s}" % rendered if rendered else "",
                                  repr(float(value)) if isinstance(value, float) else value))
    return "\n".join(lines) + "\n"


class Raw(object):
    """A non-JSON answer: bytes with their content type."""

    def __init__(self, body, content_type):
        self.body, self.content_type = body, content_type


class EventStream(object):
    """A server-sent-events answer: the handler writes what ``chunks()`` yields."""

    content_type = "text/event-stream; charset=utf-8"

    def __init__(self, hall, subscription, heartbeat):
        self.hall, self.subscription, self.heartbeat = hall, subscription, heartbeat

    def chunks(self):
        yield b"retry: 2000\n\n"
        missed, self.subscription.missed = iter(self.subscription.missed), None
        try:
            while not self.hall.stopping:
                event = next(missed, None)
                if event is None:
                    if self.subscription.dropped and self.subscription.queue.empty():
                        break
                    try:
                        event = self.subscription.queue.get(timeout=self.heartbeat)
                    except queue.Empty:
                        yield b": heartbeat\n\n"
                        continue
                event_id, kind, data = event
                yield ("id: %d\nevent: %s\ndata: %s\n\n" % (event_id, kind, _JSON(data))
                       ).encode("utf-8")
            if self.subscription.dropped:
                yield b"event: dropped\ndata: {\"reason\": \"the client fell too far behind\"}\n\n"
        finally:
            self.hall.events.unsubscribe(self.subscription)


SESSION_PREFIX = "sess_"
SESSION_SECONDS = 12 * 3600


class Sessions(object):
    """Dashboard sign-ins, in memory: session id -> (token, CSRF token,
    expiry).  A restart signs everyone out; at most ``limit`` are kept."""

    def __init__(self, limit=1000):
        self._sessions = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def open(self, token):
        session_id = SESSION_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            moment = time.monotonic()
            for old in [k for k, v in self._sessions.items() if v[2] <= moment]:
                del self._sessions[old]
            while len(self._sessions) >= self._limit:
                self._sessions.popitem(last=False)
            self._sessions[session_id] = (token, secrets.token_urlsafe(24),
                                          moment + SESSION_SECONDS)
        return session_id

    def _live(self, session_id):
        entry = self._sessions.get(session_id)
        return entry if entry and entry[2] > time.monotonic() else None

    def token(self, session_id):
        entry = self._live(session_id)
        return entry[0] if entry else None

    def csrf(self, session_id):
        entry = self._live(session_id)
        return entry[1] if entry else None

    def csrf_ok(self, session_id, presented):
        expected = self.csrf(session_id)
        return bool(expected and presented) and hmac.compare_digest(
            expected.encode(), presented.encode("utf-8", "replace"))

    def close(self, session_id):
        with self._lock:
            self._sessions.pop(session_id, None)


class MinuteCounts(object):
    """Decisions and denials per UTC minute over the last hour, for the
    dashboard's chart: read from the log once, then kept as decisions are
    logged (by this process)."""

    MINUTES = 60

    def __init__(self):
        self._counts = {}                       # "YYYY-MM-DDTHH:MM" -> [decisions, denials]
        self._lock = threading.Lock()
        self.seeded = False

    def seed(self, counts):
        with self._lock:
            if not self.seeded:
                self._counts = {minute: list(pair) for minute, pair in counts.items()}
                self.seeded = True

    def add(self, decided_at, denied):
        if not self.seeded:                     # the seed will read it from the log
            return
        minute = decided_at[:16]
        with self._lock:
            pair = self._counts.get(minute)
            if pair is None:
                if len(self._counts) > 4 * self.MINUTES:    # forget minutes long gone
                    for old in sorted(self._counts)[:-self.MINUTES]:
                        del self._counts[old]
                pair = self._counts[minute] = [0, 0]
            pair[0] += 1
            pair[1] += 1 if denied else 0

    def series(self):
        now = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
        series = []
        with self._lock:
            for back in range(self.MINUTES - 1, -1, -1):
                minute = (now - datetime.timedelta(minutes=back)).strftime("%Y-%m-%dT%H:%M")
                decisions, denied = self._counts.get(minute, (0, 0))
                series.append({"minute": minute + ":00Z", "decisions": decisions,
                               "denied": denied})
        return series


class Hall(object):
    """The application: registry, router, decision log and governance state
    over one Store.

    Every HTTP handler is a thin call of a method here, and embedding
    programs call the same methods, so the checks and answers are the same.
    Methods that change governance take the acting ``principal`` so that the
    audit trail says who did it."""

    def __init__(self, config=None):
        if config is None or isinstance(config, str):
            config = Config(db_path=config or ":memory:")
        self.config = config
        self.operator_rules = load_rules_file(config.rules_path) if config.rules_path else None
        self.file_policy = None
        if config.policy_path:
            self.file_policy = load_json_file(config.policy_path, "policy")
            load_policy_file(config.policy_path)        # refuses an invalid document
        self.attestor = None
        self.prepared = PreparedDecisions()
        if config.attest_dirs or config.require_attestation:
            self.attestor = Attestor(config.attest_dirs, config.require_attestation)
        signature = log_signature(config.db_path, config.busy_timeout)
        self.keyring = Keyring(config.receipt_keys_path, may_create=signature != "signed")
        if signature == "unchained" and self.keyring.keys:
            # A key that has signed a chain, beside a file with none: the chain
            # was removed, and sealing the rows now would vouch for any edit.
            raise ConfigError(
                "database %s has no evidence chain, but its key file %s has signed one: the "
                "chain was removed from the file. The hall will not seal its rows anew (that "
                "would vouch for them); if this is a database from before the chain, restored "
                "on purpose, move the key file away" % (config.db_path, config.receipt_keys_path))
        if signature in ("unsigned", "unchained"):  # its key made before the file changes:
            self.keyring.signing_key()          # a key file that cannot be written stops it here
        self.hall_hash = file_sha256(os.path.abspath(__file__))
        try:
            self.store = Store(config.db_path, config.busy_timeout, self.keyring)
        except StoreError as exc:
            raise ConfigError(str(exc))
        signer = self.store.head_key_id()
        if signer is not None and self.keyring.secret(signer) is None:
            # Another hall's key file (or a head rewritten under a made-up
            # key): writing would record a rewritten head for good.
            self.store.close()
            raise ConfigError("the log's head is signed with key %s, which the key file %s "
                              "does not hold: set HALL_RECEIPT_KEYS to this database's own key "
                              "file (verify-log checks the file without writing)"
                              % (clean_id(signer)[:40], config.receipt_keys_path))
        self.started_at = now_iso()
        self._registry = None
        self._registry_generation = 0           # bumped by every enrollment change
        self._registry_checked = 0.0            # when the database's version was last read
        self._governance_checked = time.monotonic()     # (and of the settings: just read)
        self._answers = {}                      # cached answers: key -> (stamp, value, refusal)
        self._answer_locks = {}                 # key -> the lock its one computer holds
        self._registry_lock = threading.Lock()
        self._alert_lock = threading.Lock()
        self._recent_alerts = {}                # dedup key -> monotonic time raised
        self._alerts_by_code = {}               # code -> [monotonic times]
        self._denial_bursts = BurstCounter(*DENIAL_BURST)
        self._login_failures = BurstCounter(*LOGIN_FAILURE_BURST)
        self._token_touched = {}
        # token hash -> (Token, when read): valid tokens are looked up in the
        # database at most once a second (a revocation here clears them at once)
        self._known_tokens = {}
        self.storage_fault_since = None         # (when, why) while writes fail
        self._generation_at_fault = None        # the store's commits counted at the last failure
        self.events = EventBus(config.events_retained, read_decisions=self.store.decision_events)
        self.metrics = Metrics()
        self.sessions = Sessions()
        self.activity = MinuteCounts()
        self.stopping = False                   # set when the server drains
        self.started_monotonic = time.monotonic()
        self.store.on_audit = lambda entry: self.events.publish("admin", entry)
        try:
            self.load_governance()
        except BaseException:                   # (stored settings it cannot use)
            self.store.close()
            raise

    def close(self, give_up_at=None):
        """Close the database (see Store.close for ``give_up_at``)."""
        self.store.close(give_up_at)

    def load_governance(self):
        """(Re)read policy, safe mode, tenants and bans from the database into
        the immutable snapshot the router reads: ``self.policy``, ``self.floor``.
        Settings changed through the API win over the configuration files."""
        def edited(what):
            return ConfigError("the stored %s (the database was edited)" % what)
        version = self.store.version("governance")     # (read first: a change after it
        try:                                            # is read at the next check)
            settings = self.store.settings()
        except ValueError as exc:
            raise edited("settings are not all JSON: %s" % exc)
        document, source = settings.get("policy"), "api"
        if document is None:
            document, source = self.file_policy, ("file" if self.file_policy else None)
        try:
            policy = compile_policy(document) if document is not None else None
        except RulesError as exc:
            raise ConfigError("stored policy: %s" % exc)
        # stored as {"tenants": [...] or null}: null (any tenant) must override the config too
        tenants = self.config.tenants
        if "tenants" in settings:
            stored = settings["tenants"]
            tenants = stored.get("tenants", False) if isinstance(stored, dict) else False
            if tenants is not None and not (isinstance(tenants, list) and all(
                    isinstance(tenant, str) for tenant in tenants)):
                raise edited("tenants setting is not a list of tenant ids or null")
        safe_mode = settings.get("safe_mode") or {}
        if not isinstance(safe_mode, dict):
            raise edited("safe mode setting is not an object")
        self.policy, self.policy_document, self.policy_source = policy, document, source
        self.safe_mode_state = safe_mode
        self.tenants_source = "api" if "tenants" in settings else (
            "config" if self.config.tenants is not None else None)
        banned = frozenset(ban["sha256"] for ban in self.store.bans())
        self.floor = Floor(bool(safe_mode.get("on")), safe_mode.get("reason"),
                           frozenset(tenants) if tenants is not None else None, banned,
                           self.hall_hash in banned)
        self._governance_version = version

    def follow_governance(self):
        """Read the governance settings again if another process sharing the
        database changed them (asked at most once a second): safe mode
        entered through one hall holds in every hall on the file.  Settings
        this hall cannot use put it in safe mode until they are mended."""
        moment = time.monotonic()
        if moment - self._governance_checked < 1.0:
            return
        self._governance_checked = moment
        if self.store.version("governance") == self._governance_version:
            return
        try:
            self.load_governance()
        except ConfigError as exc:
            _complain("[hall-api] safe mode: %s" % exc)
            self.floor = self.floor._replace(safe_mode=True, safe_mode_reason=str(exc))

    # -- reads ---------------------------------------------------------------

    def health(self):
        """Liveness, with no database access at all."""
        return {"status": "ok", "timestamp": now_iso(), "hall_hash": self.hall_hash,
                "hall_hash_banned": self.floor.hall_banned}

    def status(self):
        day = utc_day()
        total, today, denied_today = self.cached(("counts", day),
                                                 lambda: self.store.decision_counts(day))
        return {
            "hall_version": __version__,
            "hall_name": HALL_NAME,
            "workers_enrolled": len(self.registry().workers),
            "decisions_total": total,
            "decisions_today": today,
            "denials_today": denied_today,
            "timestamp": now_iso(),
            "online": True,
            # No upstream registry is configured: standing is decided locally,
            # once, when the hall starts.
            "account_standing": "ok",
            "standing_checked_at": self.started_at,
        }

    def workers(self):
        return self.registry().listing()

    def dispatches(self, limit=50):
        rows = self.store.recent_decisions(max(1, min(200, limit)))
        return {"dispatches": rows, "count": len(rows)}

    def alerts(self):
        rows = self.store.recent_alerts(50)
        return {"alerts": rows, "count": len(rows)}

    def answer_bytes(self, key, compute):
        """A read answer serialised once and reused until the next write."""
        return self.cached(key, lambda: _JSON(compute()).encode("utf-8"))

    def registry(self):
        """The current registry snapshot, rebuilt only after enrollments change:
        at once for this hall's own enrollments, within a second for those
        another process wrote into the database.

        A snapshot is kept only if no enrollment changed while it was being
        read, so a route racing an enroll can never pin a stale registry."""
        snapshot = self._registry
        moment = time.monotonic()
        if snapshot is not None and moment - self._registry_checked >= 1.0:
            self._registry_checked = moment
            if self.store.version("registry") != snapshot.version:
                self.registry_changed()
                snapshot = None
        if snapshot is None:
            if not self.store.may_wait():
                raise MustWait()                # a rebuild takes a while: a thread does it
            with self._registry_lock:
                snapshot = self._registry
                if snapshot is None:
                    generation = self._registry_generation
                    version = self.store.version("registry")
                    snapshot = Registry(self.store.enrollments(), version)
                    if generation == self._registry_generation:
                        self._registry = snapshot
                        self._registry_checked = moment
        return snapshot

    def cached(self, key, compute):
        """``compute()``, reused until the next write to the database (or for
        at most a second, for writes made by other processes).

        One thread computes and the others wait for its answer: when the
        second turns, every connection asks at once, and sixteen copies of the
        same query would add tens of milliseconds to each.  A refusal (a busy
        database, say) is shared the same way, as a future's is, rather than
        each waiter trying again and waiting out the same busy database."""
        entry = self._answers.get(key)
        if entry is None or entry[0] != self._answer_stamp():
            lock = self._answer_locks.setdefault(key, threading.Lock())
            if not lock.acquire(self.store.may_wait()):
                raise MustWait()                # the event loop does not wait for it
            try:
                stamp = self._answer_stamp()    # again: the answer may be newer by now
                entry = self._answers.get(key)
                if entry is None or entry[0] != stamp:
                    if len(self._answers) > 256:
                        self._answers.clear()
                        self._answer_locks.clear()
                    try:
                        entry = (stamp, compute(), None)
                    except HallError as exc:
                        entry = (stamp, None, exc)
                    self._answers[key] = entry
            finally:
                lock.release()
        if entry[2] is not None:
            raise entry[2]
        return entry[1]

    def _answer_stamp(self):
        return self.store.generation, int(time.monotonic())

    def registry_changed(self):
        self._registry_generation += 1
        self._registry = None

    # -- enrollment and ingest -------------------------------------------------

    def enroll(self, record, principal=TRUSTED):
        """Validate and store a worker record (checks in the documented order)."""
        require_object(record)
        for field in ("worker_id", "worker_species_id"):
            value = record.get(field)
            if value is not None and not isinstance(value, str):
                raise HallError(400, "%s must be a string" % field)
            if not value or not value.strip():
                raise HallError(400, "%s is required" % field)
        capabilities = record.get("capabilities")
        if not isinstance(capabilities, list) or not capabilities:
            raise HallError(400, "capabilities must be a non-empty list")
        if not all(isinstance(c, str) and c.strip() for c in capabilities):
            raise HallError(400, "capabilities must be a non-empty list of non-empty strings")
        if record.get("artifact_hash") is None:
            raise HallError(400, "artifact_hash is required: sha256: + hex digest of the "
                                 "record without this field, keys sorted")
        if not isinstance(record["artifact_hash"], str):
            raise HallError(400, "artifact_hash must be a string")
        risk_tier = _optional_string(record, "risk_tier", "low")
        _check_record_extras(record)
        record_json = json.dumps(record)
        if len(record_json) > MAX_RECORD_BYTES:
            raise HallError(400, "a worker record may be at most %d bytes of JSON"
                            % MAX_RECORD_BYTES)
        worker_id = record["worker_id"]
        if principal.tenant and not (in_namespace(record.get("namespace") or "", principal.tenant)
                                     and in_namespace(worker_id, principal.tenant)):
            raise HallError(403, "this token may only enroll workers whose namespace and "
                            "worker_id are in %s" % principal.tenant, "FORBIDDEN_NAMESPACE")
        if not hmac.compare_digest(compute_artifact_hash(record).encode(),
                                   record["artifact_hash"].encode("utf-8")):
            self.raise_alert("warning", "DENY_WORKER_TAMPERED",
                             "artifact_hash mismatch at enrollment for worker %s (species %s)"
                             % (clean_id(worker_id), clean_id(record["worker_species_id"])),
                             worker_id=worker_id)
            raise HallError(400, "artifact_hash mismatch", "DENY_WORKER_TAMPERED")
        code_hash = (record.get("attestation") or {}).get("code_hash")
        self.follow_governance()
        banned = self.floor.banned.intersection(
            [record["artifact_hash"]] + ([_sha256_tag_of(code_hash)] if code_hash else []))
        if banned:
            self.raise_alert("critical", "DENY_WORKER_BANNED",
                             "enrollment refused: worker %s carries a banned hash"
                             % clean_id(worker_id), worker_id=worker_id)
            raise HallError(403, "this worker's artifact is on the ban list",
                            "DENY_WORKER_BANNED")
        upsert = self.store.upsert_enrollment(
            worker_id, record["worker_species_id"], json.dumps(capabilities), risk_tier,
            record["artifact_hash"], record_json, principal.tenant)
        snapshot = self._registry
        if upsert.changed or snapshot is None or snapshot.version != upsert.registry_version:
            # The next route rebuilds the snapshot -- also after a record that
            # changed nothing here, if another process changed the registry.
            self.registry_changed()
        self.metrics.count("hall_enrollments_total",
                           result="created" if upsert.created else "updated")
        self.events.publish("enrollment", {
            "worker_id": worker_id, "worker_species_id": record["worker_species_id"],
            "capabilities": capabilities, "risk_tier": risk_tier, "created": upsert.created})
        if upsert.created:
            return {"enrolled": True, "enrollment_id": upsert.enrollment_id,
                    "worker_id": worker_id, "enrolled_at": upsert.enrolled_at,
                    "artifact_hash_verified": True}
        return {"enrolled": True, "updated": True, "worker_id": worker_id,
                "artifact_hash_verified": True}

    def retire_worker(self, worker_id, principal=TRUSTED):
        gone = self.store.delete_enrollment(
            worker_id, (principal.token_id, "worker.retire", worker_id, {}))
        if not gone:
            raise HallError(404, "no enrolled worker %s" % clean_id(worker_id)[:200], "NOT_FOUND")
        self.registry_changed()
        self.raise_alert("info", "WORKER_RETIRED", "worker %s was retired by %s"
                         % (clean_id(worker_id), principal.name), worker_id=worker_id)
        return {"retired": True, "worker_id": worker_id}

    def ingest(self, decision, principal=TRUSTED):
        """Record a decision made elsewhere (a router or SDK); idempotent by decision_id."""
        require_object(decision)
        row = {
            "decision_id": _optional_string(decision, "decision_id") or new_id(),
            "capability_id": _optional_string(decision, "capability_id", ""),
            "tenant_id": _optional_string(decision, "tenant_id", ""),
            "env": _optional_string(decision, "env", "dev"),
            "deny_reason": _optional_string(decision, "deny_reason"),
            "selected_worker": _optional_string(decision, "selected_worker"),
            "artifact_hash": _optional_string(decision, "artifact_hash"),
            "source": "ingest",
        }
        decided_at = decision.get("decided_at")
        if decided_at is None:
            row["decided_at"] = now_iso()
        else:
            row["decided_at"] = parse_timestamp(decided_at)
            if row["decided_at"] is None:
                raise HallError(400, "decided_at must be an ISO 8601 timestamp")
        denied = decision.get("denied", False)
        if denied is None:
            denied = False
        if not isinstance(denied, bool):
            raise HallError(400, "denied must be true or false")
        row["denied"] = int(denied)
        blast = decision.get("blast_score")
        if blast is not None and not (_is_int(blast) and 0 <= blast <= 100):
            raise HallError(400, "blast_score must be an integer from 0 to 100, or null")
        row["blast_score"] = blast
        check_namespace(principal.tenant, row["tenant_id"])

        def stored(new):
            if new:                             # a repeated decision_id is not news
                self.metrics.count("hall_ingested_decisions_total")
                self._announce(row, new)
        self.store.insert_decision(row, then=stored)
        return {"recorded": True, "decision_id": row["decision_id"]}

    # -- routing ---------------------------------------------------------------

    def route(self, body, principal=TRUSTED, worker_id=None):
        """Decide a route request and log it (unless dry_run).

        ``principal`` is who asks: a ``_rules`` document in the body is
        honoured only for the ``rules`` or ``admin`` scope, and a token
        limited to a namespace may only route for tenants inside it.
        ``worker_id`` pins the decision to one enrolled worker instance."""
        inp = parse_route_input(body)
        inp["worker_id"] = worker_id
        check_namespace(principal.tenant, inp["tenant_id"])
        self.follow_governance()
        rules = self.rules_for(body.get("_rules"), principal)
        registry, now = self.registry(), now_iso()
        state = (rules, registry, self.policy, self.floor)
        signing_key = self.keyring.signing_key()
        preparable = body.get("_rules") is None and PreparedDecisions.applies(
            inp, self.policy, self.attestor)
        decision = preparable and self.prepared.take(inp, state, now, signing_key)
        used = None
        if not decision:
            approval = self._presented_approval(inp["approval_id"], now)
            decision = decide(inp, rules, registry, self.policy, self.floor, now=now,
                              approval=approval, attestor=self.attestor,
                              explain=inp["explain"])
            if decision["dry_run"]:
                return self._sign(decision, signing_key)
            used = decision["preconditions_checked"].get("human_approval")
            place = used and self.store.insert_decision(decision_row(decision),
                                                        (used, decision["artifact_hash"], now))
            if used and not place:
                # Another request used the approval first: decide again as it is now.
                approval = self._presented_approval(used, now)
                if approval.get("status") == "approved":
                    approval["status"] = "used"
                decision = decide(inp, rules, registry, self.policy, self.floor, now=now,
                                  approval=approval, attestor=self.attestor,
                                  explain=inp["explain"])
                used = None
        row = decision_row(decision)

        def logged(place):
            self.metrics.count("hall_route_decisions_total",
                               outcome="denied" if decision["denied"] else "allowed",
                               deny_code=decision["deny_reason"] or "")
            self._announce(row, place)
        if used:
            logged(place)
        else:
            if decision["deny_reason"] in HUMAN_GATE_CODES and inp["approval_id"] is None:
                self._open_approval(decision)
            self.store.insert_decision(row, then=logged)
        self._watch(decision)
        if "receipt" not in decision:           # (a prepared decision comes signed)
            self._sign(decision, signing_key)
            if preparable:
                self.prepared.prepare(inp, state, decision, signing_key)
        return decision

    def _sign(self, decision, signing_key):
        decision["receipt"] = sign_receipt(decision, *signing_key)
        return decision

    def _announce(self, row, place):
        """A decision logged at ``place``, to /events subscribers and the
        activity chart."""
        self.activity.add(row["decided_at"], row["denied"])
        self.events.publish("decision", dict({c: row[c] for c in DECISION_COLUMNS},
                                             source=row.get("source")), place)

    def rules_for(self, document, principal):
        """Which rules apply: the request's own, else the operator's, else auto."""
        if document is not None:
            if not principal.scopes & {"rules", "admin"}:
                raise HallError(403, "_rules needs a token with the rules or admin scope",
                                "FORBIDDEN_RULES_OVERRIDE")
            try:
                return compile_rules(document, source="request")
            except RulesError as exc:
                raise HallError(400, "_rules: %s" % exc)
        if self.operator_rules is not None:
            return self.operator_rules
        return self.registry().auto_rules

    def _presented_approval(self, approval_id, now):
        if approval_id is None:
            return None
        return self.store.approval(approval_id, now) or {"approval_id": approval_id,
                                                         "status": "unknown"}

    def _open_approval(self, decision):
        """A human gate denied this input: open (or reuse) its pending approval."""
        reason = decision["deny_reason_if_denied"]
        moment = datetime.datetime.now(datetime.timezone.utc)
        expires = moment + datetime.timedelta(seconds=self.config.approval_ttl)
        approval_id, created = self.store.open_approval({
            "approval_id": "apr_" + uuid.uuid4().hex,
            "created_at": moment.isoformat(timespec="microseconds"),
            "expires_at": expires.isoformat(timespec="microseconds"),
            "status": "pending",
            "input_hash": decision["artifact_hash"],
            "deny_code": reason["code"],
            "reason": reason["message"],
            "capability_id": decision["capability_id"],
            "tenant_id": decision["tenant_id"],
            "env": decision["env"],
            "data_label": decision["data_label"],
        })
        reason["approval_id"] = approval_id
        for envelope in decision["telemetry_envelopes"]:
            if envelope["event_id"] == "evt.os.task.denied":
                envelope["approval_id"] = approval_id
        if created:
            self.raise_alert("info", "APPROVAL_REQUESTED",
                             "approval %s requested for %s (tenant %s): %s"
                             % (approval_id, clean_id(decision["capability_id"]),
                                clean_id(decision["tenant_id"]), reason["message"]),
                             capability_id=decision["capability_id"])

    def _watch(self, decision):
        """Alerts a decision can raise: tampering seen at routing, denial bursts."""
        if not decision["denied"]:
            return
        reason = decision["deny_reason_if_denied"]
        if reason["code"] == "DENY_WORKER_TAMPERED":
            self.raise_alert("critical", "DENY_WORKER_TAMPERED",
                             "worker %s no longer matches its attestation"
                             % clean_id(reason.get("worker_id")),
                             worker_id=reason.get("worker_id"),
                             capability_id=decision["capability_id"])
        for kind in ("tenant_id", "capability_id"):
            value = decision[kind]
            if self._denial_bursts.hit((kind, value)):
                self.raise_alert("warning", "DENIAL_BURST",
                                 "%d or more denials within %ds for %s %s"
                                 % (DENIAL_BURST[0], DENIAL_BURST[1], kind, clean_id(value)[:200]),
                                 capability_id=value if kind == "capability_id" else None,
                                 dedup=(kind, value))

    # -- alerts ----------------------------------------------------------------

    def raise_alert(self, level, code, message, worker_id=None, capability_id=None, dedup=None):
        """Append an alert unless the same one was raised within the window (or
        its code already raised ALERTS_PER_CODE), so a flood of bad requests
        leaves a bounded number of rows."""
        key = (level, code, worker_id, capability_id, dedup)
        moment = time.monotonic()
        with self._alert_lock:
            last = self._recent_alerts.get(key)
            if last is not None and moment - last < ALERT_DEDUP_SECONDS:
                return False
            times = [t for t in self._alerts_by_code.get(code, ())
                     if moment - t < ALERT_DEDUP_SECONDS]
            if len(times) >= ALERTS_PER_CODE:
                # Say once per window that alerts of this code are being dropped.
                suppressed = ("info", "ALERTS_SUPPRESSED", None, None, code)
                if moment - self._recent_alerts.get(suppressed, -ALERT_DEDUP_SECONDS) \
                        < ALERT_DEDUP_SECONDS:
                    return False
                self._recent_alerts[suppressed] = moment
                level, message, worker_id, capability_id = (
                    "warning", "more than %d %s alerts within %ds: further ones are dropped "
                    "until the flood stops" % (ALERTS_PER_CODE, code, ALERT_DEDUP_SECONDS),
                    None, None)
                code = "ALERTS_SUPPRESSED"
            else:
                self._alerts_by_code[code] = times + [moment]
            if len(self._recent_alerts) > 4096:
                self._recent_alerts = {k: t for k, t in self._recent_alerts.items()
                                       if moment - t < ALERT_DEDUP_SECONDS}
            self._recent_alerts[key] = moment
        alert = {
            "alert_id": new_id(), "created_at": now_iso(), "level": level,
            "code": code, "message": clean_id(message)[:1000],
            "worker_id": clean_id(worker_id)[:200] if worker_id is not None else None,
            "capability_id": clean_id(capability_id)[:200] if capability_id is not None else None}
        self.store.insert_alert(alert, then=lambda _: self.events.publish("alert", alert))
        return True

    def storage_fault(self, error):
        """The database refused a request (locked, read-only, full): say so in
        an alert if the database takes even that, and remember it so that the
        first write that works again raises STORAGE_RECOVERED."""
        if self.storage_fault_since is None:
            self.storage_fault_since = (now_iso(), error.message)
        self._generation_at_fault = self.store.generation
        with contextlib.suppress(HallError, sqlite3.Error):
            self.raise_alert("critical", "STORAGE_UNAVAILABLE", error.message)

    def recovers_storage(self, method):
        """True if a request with ``method`` that succeeded shows that writes
        work again after a storage fault (then call storage_recovered): a
        write request, with a commit made since the last failure (a POST
        that writes nothing shows nothing)."""
        return self.storage_fault_since is not None and \
            method in ("POST", "PUT", "DELETE", "PATCH") and \
            self.store.generation != self._generation_at_fault

    def storage_recovered(self):
        fault, self.storage_fault_since = self.storage_fault_since, None
        if fault is not None:
            with contextlib.suppress(HallError, sqlite3.Error):
                self.raise_alert("info", "STORAGE_RECOVERED", "writes work again; they failed "
                                 "from %s with: %s" % fault, dedup=fault[0])

    def failed_login(self, client):
        """A token was presented and refused; a burst from one address alerts."""
        if self._login_failures.hit(client):
            self.raise_alert("warning", "AUTH_FAILURE_BURST",
                             "%d or more failed logins within %ds from %s"
                             % (LOGIN_FAILURE_BURST[0], LOGIN_FAILURE_BURST[1], clean_id(client)),
                             dedup=client)

    # -- governance: policy, safe mode, tenants, bans, approvals ------------------

    def policy_view(self):
        return {"policy": self.policy_document, "source": self.policy_source,
                "version": self.policy.version if self.policy else None}

    def set_policy(self, document, principal=TRUSTED):
        """Replace the policy (validated whole first: never half-applied)."""
        try:
            policy = compile_policy(document)
        except RulesError as exc:
            raise HallError(400, "policy: %s" % exc, "INVALID_POLICY")
        self.store.put_setting("policy", document, (principal.token_id, "policy.set", None,
                                                    {"version": policy.version}))
        self.load_governance()
        return self.policy_view()

    def clear_policy(self, principal=TRUSTED):
        """Forget the policy set through the API (the policy file applies again)."""
        self.store.put_setting("policy", None, (principal.token_id, "policy.clear", None, {}))
        self.load_governance()
        return self.policy_view()

    def safe_mode_view(self):
        self.follow_governance()
        state = self.safe_mode_state
        return {"safe_mode": bool(state.get("on")), "reason": state.get("reason"),
                "since": state.get("since"), "by": state.get("by")}

    def set_safe_mode(self, on, reason, principal=TRUSTED):
        """Enter or leave safe mode; an alert marks each change."""
        if on and not (isinstance(reason, str) and reason.strip()):
            raise HallError(400, "reason is required to enter safe mode")
        if reason is not None and not isinstance(reason, str):
            raise HallError(400, "reason must be a string")
        changed = bool(self.safe_mode_state.get("on")) != on
        state = {"on": on, "reason": reason, "since": now_iso(), "by": principal.name}
        if changed or on:
            self.store.put_setting("safe_mode", state, (
                principal.token_id, "safe_mode.enter" if on else "safe_mode.exit", None,
                {"reason": reason}))
            self.load_governance()
        if changed:
            self.raise_alert("critical" if on else "info",
                             "SAFE_MODE_ENTERED" if on else "SAFE_MODE_EXITED",
                             "safe mode %s by %s: %s" % (
                                 "entered" if on else "left", principal.name,
                                 reason or "no reason given"),
                             dedup=state["since"])
        return self.safe_mode_view()

    def tenants_view(self):
        tenants = self.floor.tenants
        return {"tenants": sorted(tenants) if tenants is not None else None,
                "source": self.tenants_source}

    def set_tenants(self, tenants, principal=TRUSTED):
        """Set the signatory tenants (a list), or None to admit any tenant."""
        if tenants is not None and not (isinstance(tenants, list) and
                                        all(isinstance(t, str) and t.strip() for t in tenants)):
            raise HallError(400, "tenants must be a list of non-empty strings, or null")
        value = sorted(set(tenants)) if tenants is not None else None
        self.store.put_setting("tenants", {"tenants": value}, (
            principal.token_id, "tenants.set", None, {"tenants": value}))
        self.load_governance()
        return self.tenants_view()

    def clear_tenants(self, principal=TRUSTED):
        """Forget the tenants set through the API (HALL_TENANTS applies again)."""
        self.store.put_setting("tenants", None, (principal.token_id, "tenants.clear", None, {}))
        self.load_governance()
        return self.tenants_view()

    def ban_list(self):
        bans = self.store.bans()
        return {"bans": bans, "count": len(bans)}

    def ban(self, sha256, reason, principal=TRUSTED):
        sha256 = normalise_sha256(sha256)
        if not isinstance(reason, str) or not reason.strip():
            raise HallError(400, "reason is required")
        created = self.store.add_ban(sha256, reason, (principal.token_id, "ban.add", sha256,
                                                      {"reason": reason}))
        self.load_governance()
        if created:
            affected = [w.worker_id for w in self.registry().workers if sha256 in w.hashes()]
            self.raise_alert("warning", "HASH_BANNED", "%s banned by %s: %s%s" % (
                sha256, principal.name, reason, (" (enrolled workers affected: %s)"
                                                 % ", ".join(affected[:20])) if affected else ""),
                dedup=sha256)
        return created, {"banned": True, "sha256": sha256, "reason": reason}

    def unban(self, sha256, principal=TRUSTED):
        sha256 = normalise_sha256(sha256)
        if not self.store.remove_ban(sha256, (principal.token_id, "ban.remove", sha256, {})):
            raise HallError(404, "%s is not banned" % sha256, "NOT_FOUND")
        self.load_governance()
        return {"banned": False, "sha256": sha256}

    def approvals(self, status=None):
        if status is not None and status not in APPROVAL_STATUSES:
            raise HallError(400, "status must be one of: " + ", ".join(APPROVAL_STATUSES))
        rows = self.store.approvals(status, now_iso())
        return {"approvals": rows, "count": len(rows)}

    def decide_approval(self, approval_id, approve, note=None, principal=TRUSTED):
        """An admin's answer to a pending approval."""
        if note is not None and not isinstance(note, str):
            raise HallError(400, "reason must be a string")
        now = now_iso()
        status = "approved" if approve else "rejected"
        done = self.store.decide_approval(approval_id, status, note, now, (
            principal.token_id, "approval." + ("approve" if approve else "reject"), approval_id,
            {"reason": note}))
        current = self.store.approval(approval_id, now)
        if current is None:
            raise HallError(404, "no approval %s" % clean_id(approval_id)[:100], "NOT_FOUND")
        if not done:
            raise HallError(409, "approval %s is %s, not pending" % (approval_id,
                                                                     current["status"]),
                            "APPROVAL_NOT_PENDING")
        return current

    # -- operations: probes, metrics, the decision log as a tool ---------------------

    def readiness(self):
        """Can this hall serve?  The database answers a read, the writer
        commits, and how long each took.  (ready, answer)"""
        checks = {}
        for part, probe in (("database", lambda: self.store.decision_counts(utc_day())),
                            ("writer", lambda: self.store.write(lambda conn: None, timeout=2.0))):
            started = time.perf_counter()
            try:
                probe()
                checks[part] = {"ok": True}
            except (HallError, sqlite3.Error) as exc:
                checks[part] = {"ok": False, "error": getattr(exc, "message", str(exc))}
            checks[part]["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if not self.store.writer_alive:
            checks["writer"] = {"ok": False, "error": "the writer thread has stopped"}
        ready = all(check["ok"] for check in checks.values()) and not self.stopping
        failing = sorted(part for part, check in checks.items() if not check["ok"])
        return ready, {"status": "ready" if ready else "not ready", "timestamp": now_iso(),
                       "checks": checks, "failing": failing + (["stopping"] if self.stopping
                                                               else [])}

    def metrics_text(self):
        """The Prometheus text exposition of this hall."""
        samples = []
        with self.metrics._lock:
            counters = sorted(self.metrics.counters.items())
            latency = sorted((k, list(v)) for k, v in self.metrics.latency.items())
        if not any(name == "hall_route_decisions_total" for (name, _), _ in counters):
            samples.append(("hall_route_decisions_total",
                            (("deny_code", ""), ("outcome", "allowed")), 0))
        for (name, labels), value in counters:
            samples.append((name, labels, value))
        for labels, series in latency:
            total = 0                           # Prometheus buckets are cumulative
            for bound, count in zip(Metrics.BUCKETS, series):
                total += count
                samples.append(("hall_http_request_duration_seconds_bucket",
                                labels + (("le", repr(bound)),), total))
            samples.append(("hall_http_request_duration_seconds_bucket",
                            labels + (("le", "+Inf"),), series[-1]))
            samples.append(("hall_http_request_duration_seconds_sum", labels, series[-2]))
            samples.append(("hall_http_request_duration_seconds_count", labels, series[-1]))
        alerts = self.cached("alert-levels", lambda: self.store.count_by("alerts", "level"))
        pending = self.cached("pending-approvals", lambda: len(self.approvals("pending")[
            "approvals"]))
        samples.append(("hall_workers_enrolled", (), len(self.registry().workers)))
        for level in sorted(set(alerts) | {"info", "warning", "critical"}):
            samples.append(("hall_alerts", (("level", level),), alerts.get(level, 0)))
        samples.append(("hall_approvals_pending", (), pending))
        samples.append(("hall_safe_mode", (), int(self.floor.safe_mode)))
        for name, suffix in (("hall_database_bytes", ""), ("hall_wal_bytes", "-wal")):
            try:
                size = os.path.getsize(self.config.db_path + suffix)
            except OSError:
                size = 0
            samples.append((name, (), size))
        samples.append(("hall_uptime_seconds", (),
                        round(time.monotonic() - self.started_monotonic, 3)))
        samples.append(("hall_event_subscribers", (), self.events.subscribers))
        samples.append(("hall_build_info", (("hall_hash", self.hall_hash),
                                            ("version", __version__)), 1))
        return prometheus_text(samples)

    def subscribe(self, last_id=None, types=None, tenant_id=None, capability_id=None):
        """A subscription to the live feed, with filters (None: everything)."""
        def accept(event):
            _id, kind, data = event
            if types and kind not in types:
                return False
            if tenant_id is not None and data.get("tenant_id") != tenant_id:
                return False
            return capability_id is None or data.get("capability_id") == capability_id
        return self.events.subscribe(last_id, accept, not types or "decision" in types)

    def decision_page(self, filters, cursor, limit):
        """A page of the decision log, newest first, and the cursor of the next page."""
        after = None
        if cursor:
            try:
                decided_at, _, rowid = base64.urlsafe_b64decode(
                    cursor.encode("ascii") + b"==").decode("utf-8").rpartition("|")
                after = (decided_at, ascii_number(rowid))
            except (ValueError, UnicodeError):
                after = (None, None)
            if after[1] is None:
                raise HallError(400, "cursor is not one this hall gave out")
        rows = self.store.query_decisions(filters, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = None
        if more:
            rowid, last = rows[-1]
            next_cursor = base64.urlsafe_b64encode(("%s|%d" % (last["decided_at"], rowid)
                                                    ).encode("utf-8")).decode("ascii").rstrip("=")
        return {"dispatches": [row for _rowid, row in rows], "count": len(rows),
                "next_cursor": next_cursor}

    def export_decisions(self, filters, batch=1000):
        """Every decision matching ``filters``, oldest first, read page by page."""
        after = None
        while True:
            rows = self.store.query_decisions(filters, after, batch, ascending=True)
            for _rowid, row in rows:
                yield row
            if len(rows) < batch:
                return
            after = (rows[-1][1]["decided_at"], rows[-1][0])

    def prune(self, older_than_days, principal=TRUSTED):
        """Remove decisions older than the given number of days (audited)."""
        if not (_is_int(older_than_days) and 1 <= older_than_days <= 3650000):
            raise HallError(400, "older than must be from one day to 10,000 years")
        try:
            before = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
                days=older_than_days)).isoformat(timespec="microseconds")
        except OverflowError:                   # before the year 1: nothing is that old
            before = "0001-01-01T00:00:00.000000+00:00"
        removed, kept = self.store.prune_decisions(before, (
            principal.token_id, PRUNE_ACTION, None,
            {"before": before, "older_than_days": older_than_days}))
        if kept:
            self.raise_alert("critical", "LOG_CHAIN_BROKEN", "%d decisions older than %s fail "
                             "their chain check and were kept: run verify-log" % (kept, before))
        return {"removed": removed, "kept": kept, "before": before}

    def start_retention(self):
        """With HALL_RETENTION_DAYS set, prune the decision log once an hour."""
        if not self.config.retention_days:
            return None

        def loop():
            while not self.stopping:
                with contextlib.suppress(HallError, sqlite3.Error):
                    self.prune(self.config.retention_days,
                               Principal("retention", "retention", ALL_SCOPES, None))
                for _ in range(3600):
                    if self.stopping:
                        return
                    time.sleep(1)
        thread = threading.Thread(target=loop, name="hall-retention", daemon=True)
        thread.start()
        return thread

    # -- tokens and audit --------------------------------------------------------

    def create_token(self, name, scopes, tenant=None, principal=TRUSTED):
        """A new random token: (token_id, secret).  The secret is shown once
        and stored only as its hash."""
        if not isinstance(name, str) or not name.strip():
            raise HallError(400, "name must be a non-empty string")
        if not (isinstance(scopes, list) and scopes and
                all(isinstance(scope, str) for scope in scopes) and set(scopes) <= ALL_SCOPES):
            raise HallError(400, "scopes must be a non-empty list of: " + ", ".join(SCOPES))
        if tenant is not None and not (isinstance(tenant, str) and tenant.strip()):
            raise HallError(400, "tenant must be a non-empty string, or null")
        if principal.tenant and not in_namespace(tenant or "", principal.tenant):
            raise HallError(403, "a token limited to %s can only create tokens inside it"
                            % principal.tenant, "FORBIDDEN_NAMESPACE")
        secret = "hall_" + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(8)
        self.store.insert_token(token_id, name, _token_hash(secret), scopes, tenant,
                                (principal.token_id, "token.create", token_id,
                                 {"name": name, "scopes": sorted(scopes), "tenant": tenant}))
        return token_id, secret

    def tokens(self):
        rows = self.store.list_tokens()
        return {"tokens": rows, "count": len(rows)}

    def revoke_token(self, token_id, principal=TRUSTED):
        if not self.store.revoke_token(token_id, (principal.token_id, "token.revoke", token_id,
                                                  {})):
            raise HallError(404, "no active token %s" % clean_id(token_id)[:100], "NOT_FOUND")
        self._known_tokens.clear()              # effective on the next request
        return {"revoked": True, "token_id": token_id}

    def audit(self, limit=200):
        rows = self.store.audit_entries(limit)
        return {"entries": rows, "count": len(rows)}

    # -- the dashboard: sessions and activity ---------------------------------

    def session_view(self, session_id):
        """What the page may know of its session: who, which scopes, its CSRF token."""
        principal = self.authenticate(session_id) if session_id else None
        if principal is None:
            return {"signed_in": False, "name": None, "scopes": [], "csrf": None,
                    "open_reads": self.config.loopback}
        return {"signed_in": True, "name": principal.name, "scopes": sorted(principal.scopes),
                "csrf": self.sessions.csrf(session_id), "open_reads": self.config.loopback}

    def sign_in(self, token, client="-"):
        """A token (posted once) -> a new session id; the token itself is kept
        only in memory, so revoking it ends the session too."""
        if not isinstance(token, str) or not token or token.startswith(SESSION_PREFIX):
            raise HallError(400, "token must be a non-empty string")
        principal = self.authenticate(token)
        if principal is None:
            self.failed_login(client)
            raise HallError(401, "that token is not valid", "UNAUTHORIZED")
        session_id = self.sessions.open(token)
        self.store.write(lambda conn: self.store._audit(
            conn, (principal.token_id, "session.sign_in", None, {"client": clean_id(client)})))
        return session_id

    def activity_series(self):
        """Decisions and denials per minute over the last hour (oldest first)."""
        if not self.activity.seeded:
            since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
                minutes=MinuteCounts.MINUTES)).isoformat(timespec="microseconds")
            self.activity.seed(self.store.decisions_per_minute(since))
        return {"minutes": self.activity.series()}

    # -- evidence ----------------------------------------------------------------

    def verify_log(self, alert=True):
        """Walk the evidence chain (see walk_chain); a broken chain is also
        raised as a critical alert, unless ``alert`` is False: a check run
        on the file (verify-log) only reads -- with a wrong key file, an
        alert written would sign the head with the wrong key."""
        report = self.store.verify_chain(self.keyring.secrets())
        if alert and not report["intact"]:
            try:
                self.raise_alert("critical", "LOG_CHAIN_BROKEN", "the decision log was "
                                 "tampered with: " + report["first_problem"]["message"])
            except HallError as exc:            # a chain damaged so that it takes no
                # writes: the report is the answer all the same
                _complain("[hall-api] LOG_CHAIN_BROKEN not recorded: %s" % exc.message)
        return report

    def verify_receipt(self, decision):
        """Check a decision's receipt with every key of this hall, and whether
        the decision log holds it with the same signed fields."""
        require_object(decision)
        valid, why = check_receipt(decision, self.keyring.secrets())
        receipt, decision_id = decision.get("receipt"), decision.get("decision_id")
        key_id = receipt.get("key_id") if isinstance(receipt, dict) else None
        answer = {"valid": valid, "reason": why,
                  "key_id": clean_id(key_id)[:40] if isinstance(key_id, str) else None,
                  "decision_id": clean_id(decision_id) if isinstance(decision_id, str) else None,
                  "in_log": False}
        if valid and isinstance(decision_id, str):
            row = self.store.decision(decision_id)
            answer["in_log"] = row is not None and all(
                row[column] == value for column, value in decision_row(decision).items())
        return answer

    def receipt_keys(self):
        keys = self.keyring.listing()
        return {"keys": keys, "count": len(keys), "path": self.keyring.path}

    def rotate_receipt_key(self, principal=TRUSTED):
        """A new signing key; receipts made with the old ones still verify."""
        def work(conn):                         # under the database's write lock
            try:
                key_id = self.keyring.rotate()
            except ConfigError as exc:          # (the key file cannot be written)
                raise HallError(500, str(exc), "RECEIPT_KEYS_UNWRITABLE")
            self.store._audit(conn, (principal.token_id, "receipts.rotate", key_id, {}))
        self.store.write(work)
        return self.receipt_keys()

    def ensure_admin_token(self):
        """On first start (no token stored, none in HALL_TOKEN) create an admin
        token and write it to the token file with mode 0600.

        Returns (path, secret): (None, None) when no token was needed; for an
        in-memory hall with no HALL_TOKEN_FILE, (None, secret) -- nothing is
        written, the caller shows it.  An existing token file is never
        overwritten: it may hold another hall's token."""
        if self.config.token or self.store.count_tokens():
            return None, None
        if self.config.db_path == ":memory:" and not self.config.token_file:
            return None, self.create_token("first-start admin", ["admin"])[1]
        path = self.config.token_path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError("token file %s exists but database %s has no token: it belongs "
                              "to another hall or an earlier database; move it away (or set "
                              "HALL_TOKEN_FILE) and start again" % (path, self.config.db_path))
        except OSError as exc:
            raise ConfigError("cannot write token file %s: %s" % (path, exc.strerror or exc))
        try:
            with os.fdopen(fd, "w") as handle:
                secret = self.create_token("first-start admin", ["admin"])[1]
                handle.write(secret + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as exc:
            os.unlink(path)                     # (an empty file would block the next start)
            if isinstance(exc, OSError):
                raise ConfigError("cannot write token file %s: %s (a token stored "
                                  "meanwhile has a secret nobody knows: see `token list`)"
                                  % (path, exc.strerror or exc))
            raise
        return path, secret

    def authenticate(self, secret):
        """A presented token -> Principal, or None."""
        if not secret:
            return None
        if secret.startswith(SESSION_PREFIX):
            token = self.sessions.token(secret)
            return self.authenticate(token) if token else None
        if self.config.token and hmac.compare_digest(secret.encode("utf-8", "replace"),
                                                     str(self.config.token).encode("utf-8")):
            return Principal("env", "HALL_TOKEN", ALL_SCOPES, None)
        token_hash, moment = _token_hash(secret), time.monotonic()
        token, checked = self._known_tokens.get(token_hash, (None, -TOKEN_RECHECK_SECONDS))
        if moment - checked >= TOKEN_RECHECK_SECONDS:
            token = self.store.find_token(token_hash)
            if token is None:
                self._known_tokens.pop(token_hash, None)
                return None
            if len(self._known_tokens) >= 10000:
                self._known_tokens.clear()
            self._known_tokens[token_hash] = (token, moment)
        if moment - self._token_touched.get(token.token_id, -TOKEN_TOUCH_SECONDS) \
                >= TOKEN_TOUCH_SECONDS:
            self._token_touched[token.token_id] = moment
            self.store.touch_token(token.token_id, now_iso())     # queued, not awaited
        scopes = ALL_SCOPES if "admin" in token.scopes else token.scopes
        return Principal(token.token_id, token.name, scopes, token.tenant)

    # -- the registry API (seed 002), answered from the local registry ------------

    def dispatch_v1(self, body, principal=TRUSTED):
        """POST /api/v1/dispatch: a route in the hosted registry's shape."""
        require_object(body)
        for field in ("namespace", "capability"):
            _required_string(body, field)
        worker_id = _optional_string(body, "worker_id")
        context = body.get("context")
        if context is None:
            context = {}
        if not isinstance(context, dict):
            raise HallError(400, "context must be an object")
        check_namespace(principal.tenant, body["namespace"])
        if worker_id is not None:
            pinned = self.enrolled_worker(worker_id)
            check_namespace(principal.tenant, pinned.namespace)
        route_request = {"capability_id": body["capability"], "tenant_id": body["namespace"],
                         "env": context.get("env", "dev"),
                         "data_label": context.get("data_label", "PUBLIC")}
        for key, target in (("risk_tier", "tenant_risk"), ("qos_class", "qos_class"),
                            ("correlation_id", "correlation_id"), ("request", "request"),
                            ("blast_score", "blast_score"), ("approval_id", "approval_id")):
            if context.get(key) is not None:
                route_request[target] = context[key]
        try:
            decision = self.route(route_request, principal, worker_id=worker_id)
        except HallError as exc:
            exc.message = "context: " + exc.message if exc.status == 400 else exc.message
            raise
        if decision["allowed"]:
            return {"outcome": "allow", "worker_id": decision["worker_id"],
                    "capability": decision["capability_id"],
                    "correlation_id": decision["correlation_id"],
                    "decision_id": decision["decision_id"]}
        reason = decision["deny_reason_if_denied"]
        return {"outcome": "deny", "deny_code": reason["code"], "reason": reason["message"],
                "correlation_id": decision["correlation_id"],
                "decision_id": decision["decision_id"]}

    def enrolled_worker(self, worker_id):
        """The registry's Worker of that id, or 404."""
        worker = self.registry().by_id.get(worker_id)
        if worker is None:
            raise HallError(404, "no enrolled worker %s" % clean_id(worker_id)[:200], "NOT_FOUND")
        return worker

    def verify_worker(self, worker_id, principal=TRUSTED):
        """GET /api/v1/verify/{worker_id}: registered, attested, not banned?"""
        worker = self.enrolled_worker(worker_id)
        check_namespace(principal.tenant, worker.namespace)
        code_hash = (worker.attestation or {}).get("code_hash")
        attested = bool(self.attestor and code_hash and self.attestor.check(worker) is None)
        return {"worker_id": worker.worker_id, "namespace": worker.namespace,
                "worker_species_id": worker.species, "capabilities": list(worker.capabilities),
                "status": "active", "attested": attested,
                "attest_sha256": _sha256_tag_of(code_hash)[7:] if isinstance(code_hash, str)
                else None,
                "ban_status": "banned" if self.floor.banned.intersection(worker.hashes())
                else "clean"}

    def enroll_v1(self, body, principal=TRUSTED):
        """POST /api/v1/hall/enroll: enroll by package hash, for an authenticated caller."""
        require_object(body)
        for field in ("namespace", "display_name"):
            _required_string(body, field)
        package = normalise_sha256(body.get("sha256"))
        check_namespace(principal.tenant, body["namespace"])
        record = {key: value for key, value in body.items() if key != "sha256"}
        record.setdefault("worker_id", "%s.%s" % (body["namespace"], _slug(body["display_name"])))
        record.setdefault("worker_species_id", "wrk." + _slug(body["display_name"]))
        attestation = record.get("attestation")
        if attestation is None or isinstance(attestation, dict):   # (else refused by enroll)
            record["attestation"] = dict(attestation or {}, code_hash=package)
        record["artifact_hash"] = compute_artifact_hash(record)
        result = self.enroll(record, principal)
        result.update(namespace=body["namespace"], worker_species_id=record["worker_species_id"],
                      sha256=package[7:])
        return result

    def serve(self, host="127.0.0.1", port=0):
        """Serve HTTP from a background thread; returns the running server."""
        server = make_server(self, host, port)
        server.start_background()
        return server


def check_namespace(tenant, value):
    """A token limited to a namespace (its ``tenant``; None: not limited)
    acts only inside it."""
    if tenant and not in_namespace(value or "", tenant):
        raise HallError(403, "this token is limited to namespace %s" % tenant,
                        "FORBIDDEN_NAMESPACE")


def decision_row(decision):
    """The decision-log row of a RouteDecision."""
    return {
        "decision_id": decision["decision_id"],
        "decided_at": decision["timestamp"],
        "capability_id": decision["capability_id"],
        "tenant_id": decision["tenant_id"],
        "env": decision["env"],
        "denied": int(decision["denied"]),
        "deny_reason": decision["deny_reason"],
        "selected_worker": decision["selected_worker_species_id"],
        "blast_score": decision["blast_score"],
        "artifact_hash": decision["artifact_hash"],
        "source": "route",
        "correlation_id": decision["correlation_id"],
        "matched_rule_id": decision["matched_rule_id"],
        "worker_id": decision["worker_id"],
    }


def _check_record_extras(record):
    """The optional worker-record fields the hall gives a meaning to."""
    implements = record.get("currently_implements")
    if implements is not None and not (isinstance(implements, list) and
                                       all(isinstance(c, str) for c in implements)):
        raise HallError(400, "currently_implements must be a list of strings")
    environments = record.get("allowed_environments")
    if environments is not None and not (isinstance(environments, list) and
                                         all(e in ENVS for e in environments)):
        raise HallError(400, "allowed_environments must be a list of: " + ", ".join(ENVS))
    namespace = record.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise HallError(400, "namespace must be a string")
    attestation = record.get("attestation")
    if attestation is not None:
        if not isinstance(attestation, dict):
            raise HallError(400, "attestation must be an object")
        if attestation.get("code_hash") is not None:
            normalise_sha256(attestation["code_hash"], "attestation.code_hash")
        if not isinstance(attestation.get("source_file", ""), str):
            raise HallError(400, "attestation.source_file must be a string")
    if record.get("privilege_envelope") is not None:
        problem = check_envelope(record["privilege_envelope"])
        if problem:
            raise HallError(400, problem)


def _token_hash(secret):
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


###############################################################################
# 6. HTTP layer
###############################################################################
#
# ROUTES below is the one table of every path the hall serves: the dispatcher
# looks requests up in it and /openapi.json is generated from it.

# -- JSON schemas (OpenAPI 3.0 dialect) ---------------------------------------

STRING = {"type": "string"}
INTEGER = {"type": "integer"}
BOOLEAN = {"type": "boolean"}
ANY_OBJECT = {"type": "object", "additionalProperties": True}


def nullable(schema):
    return dict(schema, nullable=True)


def array_of(schema):
    return {"type": "array", "items": schema}


def object_of(required=(), **properties):
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


ERROR_SCHEMA = object_of(["error"], error=STRING, code=STRING)
HEALTH_SCHEMA = object_of(["status", "timestamp", "hall_hash", "hall_hash_banned"],
                          status=STRING, timestamp=STRING, hall_hash=STRING,
                          hall_hash_banned=BOOLEAN)
STATUS_SCHEMA = object_of(
    ["hall_version", "hall_name", "workers_enrolled", "decisions_total", "decisions_today",
     "denials_today", "timestamp", "online", "account_standing", "standing_checked_at"],
    hall_version=STRING, hall_name=STRING, workers_enrolled=INTEGER, decisions_total=INTEGER,
    decisions_today=INTEGER, denials_today=INTEGER, timestamp=STRING, online=BOOLEAN,
    account_standing=STRING, standing_checked_at=STRING)
WORKER_SCHEMA = object_of(
    ["worker_id", "worker_species_id", "capabilities", "risk_tier", "enrolled_at", "status"],
    worker_id=STRING, worker_species_id=STRING, capabilities=array_of(STRING),
    risk_tier=STRING, enrolled_at=STRING, status=STRING)
DISPATCH_SCHEMA = object_of(
    list(DECISION_COLUMNS), decision_id=STRING, decided_at=STRING, capability_id=STRING,
    tenant_id=STRING, env=STRING, denied=INTEGER, deny_reason=nullable(STRING),
    selected_worker=nullable(STRING), blast_score=nullable(INTEGER),
    artifact_hash=nullable(STRING))
ALERT_SCHEMA = object_of(
    list(ALERT_COLUMNS), alert_id=STRING, created_at=STRING, level=STRING, code=STRING,
    message=STRING, worker_id=nullable(STRING), capability_id=nullable(STRING))
ENROLL_REQUEST = dict(object_of(
    ["worker_id", "worker_species_id", "capabilities", "artifact_hash"],
    worker_id=STRING, worker_species_id=STRING, capabilities=array_of(STRING),
    risk_tier=STRING, currently_implements=array_of(STRING),
    allowed_environments=array_of({"type": "string", "enum": list(ENVS)}),
    artifact_hash=STRING), additionalProperties=True)
ENROLL_RESPONSE = object_of(
    ["enrolled", "worker_id", "artifact_hash_verified"], enrolled=BOOLEAN, updated=BOOLEAN,
    enrollment_id=STRING, worker_id=STRING, enrolled_at=STRING, artifact_hash_verified=BOOLEAN)
INGEST_REQUEST = object_of(
    (), decision_id=nullable(STRING), decided_at=nullable(STRING),
    capability_id=nullable(STRING), tenant_id=nullable(STRING), env=nullable(STRING),
    denied=nullable(BOOLEAN), deny_reason=nullable(STRING), selected_worker=nullable(STRING),
    blast_score=nullable(dict(INTEGER, minimum=0, maximum=100)),
    artifact_hash=nullable(STRING))
INGEST_RESPONSE = object_of(["recorded", "decision_id"], recorded=BOOLEAN, decision_id=STRING)
ROUTE_REQUEST = object_of(
    ROUTE_REQUIRED, capability_id=STRING,
    env={"type": "string", "enum": list(ENVS)},
    data_label={"type": "string", "enum": list(DATA_LABELS)}, tenant_id=STRING,
    tenant_risk={"type": "string", "enum": list(TENANT_RISKS)},
    qos_class={"type": "string", "enum": list(QOS_CLASSES)},
    correlation_id=STRING, request=ANY_OBJECT, blast_score=nullable(INTEGER),
    dry_run=BOOLEAN, explain=BOOLEAN, approval_id=nullable(STRING), _rules=ANY_OBJECT)
RECEIPT_SCHEMA = object_of(["alg", "key_id", "signed_fields", "mac"], alg=STRING, key_id=STRING,
                           signed_fields=array_of(STRING), mac=STRING)
TRACE_STEP = dict(object_of(["step", "name", "outcome"], step=INTEGER,
                            name={"type": "string", "enum": list(PIPELINE_STEPS)},
                            outcome={"type": "string", "enum": ["pass", "deny", "skipped",
                                                                "not_reached"]},
                            deny_code=STRING), additionalProperties=True)
ROUTE_RESPONSE = object_of(
    ["decision_id", "timestamp", "correlation_id", "tenant_id", "capability_id",
     "matched_rule_id", "env", "data_label", "tenant_risk", "qos_class", "denied",
     "deny_reason_if_denied", "selected_worker_species_id", "candidate_workers_ranked",
     "required_controls_effective", "escalation_effective", "preconditions_checked",
     "blast_score", "artifact_hash", "dry_run", "telemetry_envelopes", "allowed", "worker_id",
     "deny_reason"],
    decision_id=STRING, timestamp=STRING, correlation_id=STRING, tenant_id=STRING,
    capability_id=STRING, matched_rule_id=STRING, env=STRING, data_label=STRING,
    tenant_risk=STRING, qos_class=STRING, denied=BOOLEAN,
    deny_reason_if_denied=nullable(dict(object_of(["code", "message"], code=STRING,
                                                  message=STRING), additionalProperties=True)),
    selected_worker_species_id=nullable(STRING), selected_worker_id=nullable(STRING),
    candidate_workers_ranked=array_of(object_of(
        ["worker_species_id"], worker_species_id=STRING,
        score_hint=nullable({"type": "number"}), skip_reason=nullable(STRING))),
    required_controls_effective=array_of(STRING), escalation_effective=ANY_OBJECT,
    preconditions_checked=ANY_OBJECT, blast_score=nullable(INTEGER),
    artifact_hash=STRING, dry_run=BOOLEAN, telemetry_envelopes=array_of(ANY_OBJECT),
    allowed=BOOLEAN, worker_id=nullable(STRING), deny_reason=nullable(STRING),
    receipt=RECEIPT_SCHEMA, trace=array_of(TRACE_STEP))
DISPATCH_LIST = object_of(["dispatches", "count"], dispatches=array_of(DISPATCH_SCHEMA),
                          count=INTEGER)
OUTCOME = {"type": "string", "enum": list(POLICY_OUTCOMES)}
POLICY_REQUEST = object_of(
    ["version", "default"], version=STRING, default=OUTCOME,
    rules=array_of(object_of(["id", "outcome"], id=STRING, match=ANY_OBJECT, outcome=OUTCOME,
                             reason=STRING)))
POLICY_VIEW = object_of(["policy", "source", "version"], policy=nullable(ANY_OBJECT),
                        source=nullable(STRING), version=nullable(STRING))
APPROVAL_SCHEMA = object_of(
    list(APPROVAL_COLUMNS), **dict({c: STRING for c in APPROVAL_COLUMNS},
                                   status={"type": "string", "enum": list(APPROVAL_STATUSES)},
                                   **{c: nullable(STRING) for c in APPROVAL_COLUMNS[-5:]}))
REASON_REQUEST = object_of((), reason=nullable(STRING))
SAFE_MODE_SCHEMA = object_of(["safe_mode", "reason", "since", "by"], safe_mode=BOOLEAN,
                             reason=nullable(STRING), since=nullable(STRING), by=nullable(STRING))
BAN_SCHEMA = object_of(["sha256", "reason", "created_at"], sha256=STRING, reason=STRING,
                       created_at=STRING)
TENANTS_SCHEMA = object_of(["tenants", "source"], tenants=nullable(array_of(STRING)),
                           source=nullable(STRING))
TOKEN_SCHEMA = object_of(
    list(TOKEN_COLUMNS), token_id=STRING, name=STRING,
    scopes=array_of({"type": "string", "enum": list(SCOPES)}), tenant=nullable(STRING),
    created_at=STRING, last_used_at=nullable(STRING), revoked_at=nullable(STRING))
AUDIT_SCHEMA = object_of(list(AUDIT_COLUMNS), audit_id=STRING, at=STRING,
                         token_id=nullable(STRING), action=STRING, target=nullable(STRING),
                         detail=ANY_OBJECT)
V1_CONTEXT = object_of(
    (), env={"type": "string", "enum": list(ENVS)},
    data_label={"type": "string", "enum": list(DATA_LABELS)},
    risk_tier={"type": "string", "enum": list(TENANT_RISKS)},
    qos_class={"type": "string", "enum": list(QOS_CLASSES)}, correlation_id=STRING,
    request=ANY_OBJECT, blast_score=nullable(INTEGER), approval_id=nullable(STRING))
V1_DISPATCH_REQUEST = object_of(["namespace", "capability"], namespace=STRING,
                                capability=STRING, worker_id=STRING, context=V1_CONTEXT)
V1_DISPATCH_RESPONSE = object_of(
    ["outcome", "correlation_id", "decision_id"],
    outcome={"type": "string", "enum": ["allow", "deny"]}, worker_id=STRING, capability=STRING,
    correlation_id=STRING, decision_id=STRING, deny_code=STRING, reason=STRING)
V1_VERIFY = object_of(
    ["worker_id", "namespace", "status", "attested", "attest_sha256", "ban_status"],
    worker_id=STRING, namespace=nullable(STRING), worker_species_id=STRING,
    capabilities=array_of(STRING), status=STRING, attested=BOOLEAN,
    attest_sha256=nullable(STRING), ban_status={"type": "string", "enum": ["clean", "banned"]})
V1_ENROLL_REQUEST = dict(object_of(
    ["namespace", "display_name", "capabilities", "sha256"], namespace=STRING,
    display_name=STRING, capabilities=array_of(STRING), sha256=STRING, worker_id=STRING,
    worker_species_id=STRING, risk_tier=STRING), additionalProperties=True)
V1_ENROLL_RESPONSE = dict(ENROLL_RESPONSE, properties=dict(
    ENROLL_RESPONSE["properties"], namespace=STRING, worker_species_id=STRING, sha256=STRING))


ACTIVITY_SCHEMA = object_of(["minutes"], minutes=array_of(object_of(
    ["minute", "decisions", "denied"], minute=STRING, decisions=INTEGER, denied=INTEGER)))
SESSION_SCHEMA = object_of(["signed_in", "name", "scopes", "csrf", "open_reads"],
                           signed_in=BOOLEAN, name=nullable(STRING), scopes=array_of(STRING),
                           csrf=nullable(STRING), open_reads=BOOLEAN)
CHAIN_PROBLEM = object_of(["problem", "seq", "message"],
                          problem={"type": "string",
                                   "enum": ["altered", "deleted", "inserted", "head"]},
                          seq=nullable(INTEGER), message=STRING)
CHAIN_REPORT = object_of(
    ["intact", "entries", "length", "head", "pruned", "sealed", "problems", "first_problem"],
    intact=BOOLEAN, entries=INTEGER, length=INTEGER, head=nullable(STRING), pruned=INTEGER,
    sealed=nullable(object_of(["entries", "at"], entries=INTEGER, at=nullable(STRING))),
    problems=array_of(CHAIN_PROBLEM), first_problem=nullable(CHAIN_PROBLEM))
RECEIPT_CHECK = object_of(["valid", "reason", "key_id", "decision_id", "in_log"],
                          valid=BOOLEAN, reason=STRING, key_id=nullable(STRING),
                          decision_id=nullable(STRING), in_log=BOOLEAN)
RECEIPT_KEYS = object_of(["keys", "count", "path"], keys=array_of(object_of(
    ["key_id", "created_at", "current"], key_id=STRING, created_at=STRING, current=BOOLEAN)),
    count=INTEGER, path=nullable(STRING))


def list_of(name, schema):
    return object_of([name, "count"], count=INTEGER, **{name: array_of(schema)})


_SCHEMA_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool,
                 "integer": int, "number": (int, float)}


def schema_problem(value, schema, where="$"):
    """The first way ``value`` breaks ``schema`` (the dialect above: type,
    nullable, enum, required, properties, items), or None.  The command
    line holds a running hall's answers to it before reading them."""
    if value is None:
        return None if schema.get("nullable") else "%s is null" % where
    kind = schema.get("type")
    if kind and not (isinstance(value, _SCHEMA_TYPES[kind]) and
                     not (kind in ("integer", "number") and isinstance(value, bool))):
        return "%s is not of type %s" % (where, kind)
    if "enum" in schema and value not in schema["enum"]:
        return "%s is not one of %s" % (where, ", ".join(map(str, schema["enum"])))
    if kind == "object":
        for name in schema.get("required", ()):
            if name not in value:
                return "%s lacks %s" % (where, name)
        for name, sub in schema.get("properties", {}).items():
            problem = (schema_problem(value[name], sub, "%s.%s" % (where, name))
                       if name in value else None)
            if problem:
                return problem
    if kind == "array":
        for index, item in enumerate(value):
            problem = schema_problem(item, schema.get("items", {}), "%s[%d]" % (where, index))
            if problem:
                return problem
    return None


class Request(object):
    """What a handler sees: the parsed request and who sent it."""

    def __init__(self, method, path, query, headers, body, params, principal, client="-"):
        self.method = method
        self.client = client        # the peer address (for failed-login bursts)
        self.path = path
        self.query = query          # {name: first value}
        self.headers = headers
        self.raw_body = body
        self.params = params        # path parameters
        self.principal = principal
        self._json = None

    def json(self):
        if self._json is None:
            self._json = parse_json_body(self.raw_body)
        return self._json

    def optional_json(self):
        """The body as a JSON object, or {} when there is none."""
        if not self.raw_body.strip():
            return {}
        return require_object(self.json())


# -- handlers: thin calls into the Hall ----------------------------------------

def handle_health(hall, req):
    return 200, hall.health()


def handle_status(hall, req):
    return 200, hall.status()


def handle_workers(hall, req):
    return 200, hall.registry().listing_bytes()


def query_int(req, name, default, low, high):
    """An integer query parameter, clamped to low..high; not an integer is 400."""
    text = req.query.get(name)
    if text is None:
        return default
    text = text.strip()
    if not re.match(r"^[+-]?[0-9]+$", text):
        raise HallError(400, "%s must be an integer" % name)
    if len(text.lstrip("+-")) > 12:             # beyond any bound: no need to convert
        return low if text.startswith("-") else high
    return max(low, min(high, int(text)))


DISPATCH_FILTERS = ("tenant_id", "capability_id", "env", "denied", "since", "until")


def handle_dispatches(hall, req):
    limit = query_int(req, "limit", 50, 1, 200)
    asked = {name: req.query[name] for name in DISPATCH_FILTERS if name in req.query}
    if not asked and "cursor" not in req.query:     # the reference's answer, cached
        return 200, hall.answer_bytes(("dispatches", limit), lambda: hall.dispatches(limit))
    filters = dict(asked)
    if "denied" in filters:
        flag = filters["denied"].strip().lower()
        if flag not in ("0", "1", "true", "false"):
            raise HallError(400, "denied must be 0, 1, true or false")
        filters["denied"] = int(flag in ("1", "true"))
    for bound in ("since", "until"):
        if bound in filters:
            filters[bound] = parse_timestamp(filters[bound])
            if filters[bound] is None:
                raise HallError(400, "%s must be an ISO 8601 timestamp" % bound)
    return 200, hall.decision_page(filters, req.query.get("cursor"), limit)


def handle_ready(hall, req):
    ready, answer = hall.readiness()
    return (200 if ready else 503), answer


def handle_metrics(hall, req):
    return 200, Raw(hall.metrics_text().encode("utf-8"),
                    "text/plain; version=0.0.4; charset=utf-8")


EVENT_TYPES = ("decision", "alert", "enrollment", "admin")
HEARTBEAT_SECONDS = 15.0


def handle_events(hall, req):
    last = req.headers.get("Last-Event-ID") or req.query.get("last_event_id")
    if last is not None:
        last = ascii_number(last)
        if last is None:
            raise HallError(400, "Last-Event-ID must be an event id this hall sent")
    types = None
    if req.query.get("types"):
        types = set(t.strip() for t in req.query["types"].split(",") if t.strip())
        if not types <= set(EVENT_TYPES):
            raise HallError(400, "types must be a comma list of: " + ", ".join(EVENT_TYPES))
    subscription = hall.subscribe(last, types,
                                  req.query.get("tenant_id"), req.query.get("capability_id"))
    return 200, EventStream(hall, subscription, HEARTBEAT_SECONDS)


def handle_active_dispatches(hall, req):
    return 200, {"dispatches": [], "count": 0}


def handle_alerts(hall, req):
    return 200, hall.answer_bytes("alerts", hall.alerts)


def handle_enroll(hall, req):
    result = hall.enroll(req.json(), req.principal)
    return (200 if result.get("updated") else 201), result


def handle_retire_worker(hall, req):
    return 200, hall.retire_worker(req.params["worker_id"], req.principal)


def handle_ingest(hall, req):
    return 201, hall.ingest(req.json(), req.principal)


def handle_route(hall, req):
    return 200, hall.route(req.json(), req.principal)


def handle_openapi(hall, req):
    return 200, openapi_document()


def handle_get_policy(hall, req):
    return 200, hall.policy_view()


def handle_put_policy(hall, req):
    return 200, hall.set_policy(req.json(), req.principal)


def handle_delete_policy(hall, req):
    return 200, hall.clear_policy(req.principal)


def handle_approvals(hall, req):
    return 200, hall.approvals(req.query.get("status") or None)


def handle_approve(hall, req):
    return 200, hall.decide_approval(req.params["approval_id"], True,
                                     req.optional_json().get("reason"), req.principal)


def handle_reject(hall, req):
    return 200, hall.decide_approval(req.params["approval_id"], False,
                                     req.optional_json().get("reason"), req.principal)


def handle_safe_mode(hall, req):
    return 200, hall.safe_mode_view()


def handle_enter_safe_mode(hall, req):
    return 200, hall.set_safe_mode(True, req.optional_json().get("reason"), req.principal)


def handle_exit_safe_mode(hall, req):
    return 200, hall.set_safe_mode(False, req.optional_json().get("reason"), req.principal)


def handle_add_ban(hall, req):
    body = require_object(req.json())
    created, result = hall.ban(body.get("sha256"), body.get("reason"), req.principal)
    return (201 if created else 200), result


def handle_remove_ban(hall, req):
    return 200, hall.unban(req.params["sha256"], req.principal)


def handle_ban_list(hall, req):
    return 200, hall.ban_list()


def handle_get_tenants(hall, req):
    return 200, hall.tenants_view()


def handle_put_tenants(hall, req):
    body = req.json()
    if not isinstance(body, dict) or "tenants" not in body:
        raise HallError(400, 'request body must be {"tenants": [...]} or {"tenants": null}')
    return 200, hall.set_tenants(body["tenants"], req.principal)


def handle_delete_tenants(hall, req):
    return 200, hall.clear_tenants(req.principal)


def handle_create_token(hall, req):
    body = require_object(req.json())
    token_id, secret = hall.create_token(body.get("name"), body.get("scopes"),
                                         body.get("tenant"), req.principal)
    listed = [t for t in hall.tokens()["tokens"] if t["token_id"] == token_id][0]
    return 201, dict(listed, token=secret)


def handle_tokens(hall, req):
    return 200, hall.tokens()


def handle_revoke_token(hall, req):
    return 200, hall.revoke_token(req.params["token_id"], req.principal)


def handle_audit(hall, req):
    return 200, hall.audit()


def handle_dashboard(hall, req):
    return 200, Raw(DASHBOARD_PAGE, "text/html; charset=utf-8"), DASHBOARD_HEADERS


def handle_activity(hall, req):
    return 200, hall.activity_series()


def _session_cookie_header(hall, value, max_age):
    return {"Set-Cookie": "%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Strict%s" % (
        SESSION_COOKIE, value, max_age, "; Secure" if hall.config.tls_cert else ""),
        "Cache-Control": "no-store"}


def handle_session(hall, req):
    return 200, hall.session_view(session_cookie(req.headers)), {"Cache-Control": "no-store"}


def handle_sign_in(hall, req):
    body = require_object(req.json())
    session_id = hall.sign_in(body.get("token"), req.client)
    return (200, hall.session_view(session_id),
            _session_cookie_header(hall, session_id, SESSION_SECONDS))


def handle_sign_out(hall, req):
    session_id = session_cookie(req.headers)
    if session_id and hall.sessions.csrf(session_id):
        if not hall.sessions.csrf_ok(session_id, req.headers.get("X-CSRF-Token")):
            raise HallError(403, "signing out needs the session's X-CSRF-Token header",
                            "CSRF_FAILED")
        hall.sessions.close(session_id)
    return 200, hall.session_view(None), _session_cookie_header(hall, "", 0)


def handle_verify_log(hall, req):
    return 200, hall.verify_log()


def handle_verify_receipt(hall, req):
    return 200, hall.verify_receipt(req.json())


def handle_receipt_keys(hall, req):
    return 200, hall.receipt_keys()


def handle_rotate_receipt_key(hall, req):
    return 200, hall.rotate_receipt_key(req.principal)


def handle_dispatch_v1(hall, req):
    return 200, hall.dispatch_v1(req.json(), req.principal)


def handle_verify_v1(hall, req):
    return 200, hall.verify_worker(req.params["worker_id"], req.principal)


def handle_enroll_v1(hall, req):
    result = hall.enroll_v1(req.json(), req.principal)
    return (200 if result.get("updated") else 201), result


class Route(namedtuple("Route", "method path handler scope open_on_loopback summary "
                                "query request responses errors inline namespaced")):
    """One row of the route table.

    scope: the token scope needed (None: never needs a token).
    open_on_loopback: the reference documents it without auth, so on a
    loopback bind it stays open to existing scripts and the Monitor.
    inline: a hot path, answered on the HTTP event loop's own thread.  Its
    handler never waits: it reads cached answers or rows by key, and its log
    appends are committed by the loop, which holds the answer until then
    (anything else that would wait raises MustWait, and a thread answers).
    Not /dispatches: a filter on an unindexed column may scan the whole log.
    namespaced: an admin route whose handler keeps a token limited to a
    namespace inside it; the other admin routes act on the whole hall, and
    refuse such a token."""


def route(method, path, handler, scope, summary, open_on_loopback=False, query=(),
          request=None, responses=None, errors=(), inline=False, namespaced=False):
    return Route(method, path, handler, scope, open_on_loopback, summary, tuple(query), request,
                 responses or {}, tuple(errors), inline, namespaced)


LIMIT_PARAM = ("limit", INTEGER, "How many decisions, 1..200 (default 50; clamped).")
DISPATCH_QUERY = [LIMIT_PARAM] + [
    ("tenant_id", STRING, "Only this tenant."), ("capability_id", STRING, "Only this capability."),
    ("env", STRING, "Only this environment."), ("denied", STRING, "0/1 or true/false."),
    ("since", STRING, "ISO 8601: decided at or after."), ("until", STRING, "ISO 8601: before."),
    ("cursor", STRING, "Paging: empty for the first page, then next_cursor.")]
READY_SCHEMA = object_of(["status", "timestamp", "checks", "failing"], status=STRING,
                         timestamp=STRING, checks=ANY_OBJECT, failing=array_of(STRING))
TEXT_RESPONSE = {"type": "string"}

ROUTES = [
    route("GET", "/health", handle_health, None, "Liveness; never touches the database.",
          responses={200: HEALTH_SCHEMA}, inline=True),
    route("GET", "/status", handle_status, "read", "Enrollment and decision counts.",
          open_on_loopback=True, responses={200: STATUS_SCHEMA}, inline=True),
    route("GET", "/workers", handle_workers, "read", "Enrolled workers, newest first.",
          open_on_loopback=True,
          responses={200: object_of(["workers", "count"], workers=array_of(WORKER_SCHEMA),
                                    count=INTEGER)}, inline=True),
    route("GET", "/dispatches", handle_dispatches, "read",
          "Recent decisions, newest first; filters and cursor paging on request.",
          open_on_loopback=True, query=DISPATCH_QUERY,
          responses={200: dict(DISPATCH_LIST, properties=dict(
              DISPATCH_LIST["properties"], next_cursor=nullable(STRING)))}),
    route("GET", "/dispatches/active", handle_active_dispatches, "read",
          "In-flight dispatches (none are tracked: always empty).", open_on_loopback=True,
          responses={200: DISPATCH_LIST}),
    route("GET", "/alerts", handle_alerts, "read", "Recent governance alerts, at most 50.",
          open_on_loopback=True,
          responses={200: object_of(["alerts", "count"], alerts=array_of(ALERT_SCHEMA),
                                    count=INTEGER)}),
    route("POST", "/enroll", handle_enroll, "write", "Enroll or update a worker.",
          open_on_loopback=True, request=ENROLL_REQUEST,
          responses={201: ENROLL_RESPONSE, 200: ENROLL_RESPONSE}, inline=True),
    route("POST", "/decisions/ingest", handle_ingest, "write",
          "Record a decision made by another router.", open_on_loopback=True,
          request=INGEST_REQUEST, responses={201: INGEST_RESPONSE}, inline=True),
    route("POST", "/api/route", handle_route, "route",
          "Decide whether a capability may run, and on which worker.",
          request=ROUTE_REQUEST, responses={200: ROUTE_RESPONSE}, inline=True),
    route("GET", "/openapi.json", handle_openapi, None, "This document.",
          responses={200: ANY_OBJECT}),
    # -- operations --------------------------------------------------------------
    route("GET", "/healthz", handle_health, None, "Alias of /health.",
          responses={200: HEALTH_SCHEMA}, inline=True),
    route("GET", "/ready", handle_ready, None,
          "Readiness: the database answers and the writer commits (503 names what fails).",
          responses={200: READY_SCHEMA, 503: READY_SCHEMA}),
    route("GET", "/readyz", handle_ready, None, "Alias of /ready.",
          responses={200: READY_SCHEMA, 503: READY_SCHEMA}),
    route("GET", "/metrics", handle_metrics, "read",
          "Prometheus text exposition format (text/plain; version=0.0.4).",
          open_on_loopback=True, responses={200: TEXT_RESPONSE}),
    route("GET", "/events", handle_events, "read",
          "Server-sent events: decisions, alerts, enrollments, admin actions as they happen.",
          open_on_loopback=True, query=[
              ("types", STRING, "Comma list of decision, alert, enrollment, admin."),
              ("tenant_id", STRING, "Only events of this tenant."),
              ("capability_id", STRING, "Only events of this capability."),
              ("last_event_id", STRING, "Resume after this id (or the Last-Event-ID header).")],
          responses={200: TEXT_RESPONSE}),
    # -- governance ------------------------------------------------------------
    route("DELETE", "/workers/{worker_id}", handle_retire_worker, "admin",
          "Retire (remove) an enrolled worker.",
          responses={200: object_of(["retired", "worker_id"], retired=BOOLEAN,
                                    worker_id=STRING)}),
    route("GET", "/api/policy", handle_get_policy, "admin", "The policy gate in force.",
          responses={200: POLICY_VIEW}),
    route("PUT", "/api/policy", handle_put_policy, "admin",
          "Replace the policy gate (validated whole; stored in the database).",
          request=POLICY_REQUEST, responses={200: POLICY_VIEW}),
    route("DELETE", "/api/policy", handle_delete_policy, "admin",
          "Forget the API-set policy; the policy file (if any) applies again.",
          responses={200: POLICY_VIEW}),
    route("GET", "/api/approvals", handle_approvals, "admin", "Human approvals, newest first.",
          query=[("status", {"type": "string", "enum": list(APPROVAL_STATUSES)},
                  "Only approvals in this state.")],
          responses={200: list_of("approvals", APPROVAL_SCHEMA)}),
    route("POST", "/api/approvals/{approval_id}/approve", handle_approve, "admin",
          "Approve a pending approval (the same input may then route once).",
          request=REASON_REQUEST, responses={200: APPROVAL_SCHEMA}, errors=[409]),
    route("POST", "/api/approvals/{approval_id}/reject", handle_reject, "admin",
          "Reject a pending approval.", request=REASON_REQUEST,
          responses={200: APPROVAL_SCHEMA}, errors=[409]),
    route("GET", "/api/safe-mode", handle_safe_mode, "read", "Whether safe mode is on.",
          responses={200: SAFE_MODE_SCHEMA}),
    route("POST", "/api/safe-mode/enter", handle_enter_safe_mode, "admin",
          "Deny every route until safe mode is left (a reason is required).",
          request=REASON_REQUEST, responses={200: SAFE_MODE_SCHEMA}),
    route("POST", "/api/safe-mode/exit", handle_exit_safe_mode, "admin", "Leave safe mode.",
          request=REASON_REQUEST, responses={200: SAFE_MODE_SCHEMA}),
    route("POST", "/api/bans", handle_add_ban, "admin",
          "Ban a sha256 (worker artifact, worker code or hall build).",
          request=object_of(["sha256", "reason"], sha256=STRING, reason=STRING),
          responses={201: object_of(["banned", "sha256"], banned=BOOLEAN, sha256=STRING,
                                    reason=STRING),
                     200: object_of(["banned", "sha256"], banned=BOOLEAN, sha256=STRING,
                                    reason=STRING)}),
    route("DELETE", "/api/bans/{sha256}", handle_remove_ban, "admin", "Lift a ban.",
          responses={200: object_of(["banned", "sha256"], banned=BOOLEAN, sha256=STRING)}),
    route("GET", "/wcp/registry/ban-list", handle_ban_list, "read", "The ban list.",
          responses={200: list_of("bans", BAN_SCHEMA)}),
    route("GET", "/api/tenants", handle_get_tenants, "admin",
          "The signatory tenants (null: any tenant).", responses={200: TENANTS_SCHEMA}),
    route("PUT", "/api/tenants", handle_put_tenants, "admin",
          "Set the signatory tenants, or null to admit any tenant.",
          request=object_of(["tenants"], tenants=nullable(array_of(STRING))),
          responses={200: TENANTS_SCHEMA}),
    route("DELETE", "/api/tenants", handle_delete_tenants, "admin",
          "Forget the API-set tenants; HALL_TENANTS (if set) applies again.",
          responses={200: TENANTS_SCHEMA}),
    route("GET", "/api/tokens", handle_tokens, "admin", "API tokens (never their secrets).",
          responses={200: list_of("tokens", TOKEN_SCHEMA)}),
    route("POST", "/api/tokens", handle_create_token, "admin",
          "Create a token; its secret is in this answer only.", namespaced=True,
          request=object_of(["name", "scopes"], name=STRING,
                            scopes=array_of({"type": "string", "enum": list(SCOPES)}),
                            tenant=nullable(STRING)),
          responses={201: dict(TOKEN_SCHEMA, required=list(TOKEN_COLUMNS) + ["token"],
                               properties=dict(TOKEN_SCHEMA["properties"], token=STRING))}),
    route("DELETE", "/api/tokens/{token_id}", handle_revoke_token, "admin",
          "Revoke a token at once.",
          responses={200: object_of(["revoked", "token_id"], revoked=BOOLEAN, token_id=STRING)}),
    route("GET", "/api/audit", handle_audit, "admin",
          "The append-only audit trail of admin actions, newest first.",
          responses={200: list_of("entries", AUDIT_SCHEMA)}),
    # -- the dashboard -------------------------------------------------------------
    route("GET", "/", handle_dashboard, None,
          "The Hall Monitor: a live dashboard page (HTML, no external resources).",
          responses={200: TEXT_RESPONSE}),
    route("GET", "/api/activity", handle_activity, "read",
          "Decisions and denials per minute over the last hour, oldest first.",
          open_on_loopback=True, responses={200: ACTIVITY_SCHEMA}),
    route("GET", "/api/session", handle_session, None,
          "The dashboard session of this browser (its CSRF token when signed in).",
          responses={200: SESSION_SCHEMA}),
    route("POST", "/api/session", handle_sign_in, None,
          "Sign in: post a token once, get an HttpOnly, SameSite=Strict session cookie.",
          request=object_of(["token"], token=STRING), responses={200: SESSION_SCHEMA},
          errors=[401]),
    route("DELETE", "/api/session", handle_sign_out, None,
          "Sign out (with the session's X-CSRF-Token header); the cookie is cleared.",
          responses={200: SESSION_SCHEMA}),
    # -- evidence ----------------------------------------------------------------
    route("GET", "/api/log/verify", handle_verify_log, "admin",
          "Walk the hash chain of decisions, alerts and audit entries; name what was "
          "altered, deleted or inserted.", responses={200: CHAIN_REPORT}),
    route("POST", "/api/receipts/verify", handle_verify_receipt, "read",
          "Check a RouteDecision's receipt (send the decision as the hall answered it).",
          open_on_loopback=True, request=dict(object_of(["receipt"], receipt=RECEIPT_SCHEMA),
                                              additionalProperties=True),
          responses={200: RECEIPT_CHECK}),
    route("GET", "/api/receipts/keys", handle_receipt_keys, "admin",
          "The receipt keys (never their secrets); the current one signs.",
          responses={200: RECEIPT_KEYS}),
    route("POST", "/api/receipts/keys/rotate", handle_rotate_receipt_key, "admin",
          "Make a new signing key; receipts made with older keys still verify.",
          responses={200: RECEIPT_KEYS}),
    # -- the registry API (seed 002), served from the local registry -----------
    route("POST", "/api/v1/dispatch", handle_dispatch_v1, "route",
          "Route a capability in the hosted registry's request and answer shape.",
          request=V1_DISPATCH_REQUEST, responses={200: V1_DISPATCH_RESPONSE}, inline=True),
    route("GET", "/api/v1/verify/{worker_id}", handle_verify_v1, "read",
          "Is a worker registered, attested and not banned?", responses={200: V1_VERIFY}),
    route("POST", "/api/v1/hall/enroll", handle_enroll_v1, "write",
          "Enroll a worker by its package hash.", request=V1_ENROLL_REQUEST,
          responses={201: V1_ENROLL_RESPONSE, 200: V1_ENROLL_RESPONSE}),
    route("GET", "/wcp/registry/verify/{worker_id}", handle_verify_v1, "read",
          "Verify a worker against the local registry.", responses={200: V1_VERIFY}),
]


def _compile_routes(routes):
    """{path: {method: Route}} for fixed paths, [(regex, {method: Route})] for
    paths with {parameters}."""
    fixed, patterned = {}, []
    for r in routes:
        if "{" not in r.path:
            fixed.setdefault(r.path, {})[r.method] = r
            continue
        regex = re.compile("^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(r.path)) + "$")
        for existing, methods in patterned:
            if existing.pattern == regex.pattern:
                methods[r.method] = r
                break
        else:
            patterned.append((regex, {r.method: r}))
    return fixed, patterned


_FIXED_ROUTES, _PATTERNED_ROUTES = _compile_routes(ROUTES)


def find_route(path):
    """(methods, path parameters) for a path, or (None, None)."""
    methods = _FIXED_ROUTES.get(path)
    if methods is not None:
        return methods, {}
    for regex, methods in _PATTERNED_ROUTES:
        match = regex.match(path)
        if match:
            return methods, {k: unquote(v) for k, v in match.groupdict().items()}
    return None, None


_OPENAPI = []


def openapi_document():
    """The OpenAPI 3.0 document, generated from ROUTES (built once)."""
    if _OPENAPI:
        return _OPENAPI[0]
    paths = {}
    for r in ROUTES:
        operation = {
            "summary": r.summary,
            "operationId": r.handler.__name__.replace("handle_", "", 1),
            "responses": {},
        }
        if r.scope:
            operation["security"] = [{"bearerAuth": []}, {"cookieAuth": []}]
            operation["description"] = "Needs a token with the `%s` scope%s." % (
                r.scope, " (open when the hall is bound to loopback)" if r.open_on_loopback
                else "")
        else:
            operation["security"] = []
        parameters = [{"name": name, "in": "path", "required": True, "schema": STRING}
                      for name in re.findall(r"\{(\w+)\}", r.path)]
        parameters += [{"name": name, "in": "query", "required": False, "schema": schema,
                        "description": text} for name, schema, text in r.query]
        if parameters:
            operation["parameters"] = parameters
        if r.request is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": r.request}}}
        media = {"/metrics": "text/plain", "/events": "text/event-stream",
                 "/": "text/html"}.get(
            r.path, "application/json")
        for status, schema in sorted(r.responses.items()):
            operation["responses"][str(status)] = {
                "description": "OK" if status < 300 else "See schema",
                "content": {media: {"schema": schema}}}
        errors = ["400"] if (r.request is not None or r.query) else []
        if r.scope:
            errors += ["401", "403"]
        if "{" in r.path:
            errors.append("404")
        if r.request is not None:
            errors += ["413", "415"]
        errors += [str(status) for status in r.errors]
        for status in errors + ["500", "503"]:
            operation["responses"][status] = {"$ref": "#/components/responses/Error"}
        paths.setdefault(r.path, {})[r.method.lower()] = operation
    document = {
        "openapi": "3.0.3",
        "info": {"title": "Hall Server API", "version": __version__,
                 "description": "PyHall Hall Server -- local API for Hall Monitor and "
                                "orchestrator integrations"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "cookieAuth": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE}},
            "schemas": {"Error": ERROR_SCHEMA},
            "responses": {"Error": {"description": "An error",
                                    "content": {"application/json": {
                                        "schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
    }
    _OPENAPI.append(document)
    return document


# -- dispatch --------------------------------------------------------------------

def _presented_token(headers):
    """The bearer token, else the session cookie: (secret or None, from_cookie)."""
    authorization = headers.get("Authorization") or ""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    session = session_cookie(headers)
    return session, session is not None


def session_cookie(headers):
    for cookie in (headers.get("Cookie") or "").split(";"):
        name, _, value = cookie.strip().partition("=")
        if name == SESSION_COOKIE and value:
            return value.strip('"')
    return None


def _is_json_type(content_type):
    if not content_type:
        return True                             # tolerated: the body is still parsed as JSON
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def dispatch(hall, method, target, headers, body, client="-", limiter=None, context=None):
    """One request -> (status, payload, extra headers); the payload is sent as
    JSON, or None.  Refusals are raised as HallError.

    The token is looked up only for routes that have a scope (so /health never
    touches the database); ``context["principal"]`` tells the caller who it was."""
    if target.startswith("/"):                  # (urlsplit would read //x/y as host x)
        path, _, query_text = target.partition("#")[0].partition("?")
    else:                                       # the absolute form, http://host/path
        try:
            split = urlsplit(target)
        except ValueError:
            raise HallError(400, "the request target is not a valid URL")
        path, query_text = split.path or "/", split.query
    methods, params = find_route(path)
    if method == "OPTIONS":                     # CORS preflight
        allowed = sorted(set(methods or ()) | {"OPTIONS"}) if methods else None
        return 204, None, {"Access-Control-Allow-Methods": ", ".join(
            allowed or ["GET", "POST", "PUT", "DELETE", "OPTIONS"]),
            "Access-Control-Allow-Headers": "Content-Type, Authorization",
            "Access-Control-Max-Age": "600"}
    if methods is None:
        raise HallError(404, "no such path: %s" % clean_id(path)[:200], "NOT_FOUND")
    entry = methods.get("GET" if method == "HEAD" else method)
    if entry is None:
        allow = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()) | {"OPTIONS"})
        raise HallError(405, "method %s is not allowed on %s" % (method, path),
                        "METHOD_NOT_ALLOWED", {"Allow": ", ".join(allow)})
    if context is not None:
        context["route"] = entry.path
    principal = None
    if entry.scope:
        secret, from_cookie = _presented_token(headers)
        principal = hall.authenticate(secret)
        if secret and principal is None:
            hall.failed_login(client)
        if context is not None:
            context["principal"] = principal
        # A browser sends its session cookie by itself: a change made with one
        # must also carry the session's CSRF token, which only the hall's own
        # page can read.  (A cookie holding a token is a scripted client's.)
        if from_cookie and secret.startswith(SESSION_PREFIX) and method not in ("GET", "HEAD") \
                and not hall.sessions.csrf_ok(secret, headers.get("X-CSRF-Token")):
            raise HallError(403, "a change made with a session cookie needs its X-CSRF-Token "
                                 "header", "CSRF_FAILED")
    if limiter is not None and path not in UNLIMITED_PATHS:
        charged = principal.token_id if principal else client
        wait = limiter.wait_time(charged)
        if context is not None and not wait:
            context["charged"] = charged        # (given back if a thread asks again)
        if wait:
            raise HallError(429, "rate limit exceeded; retry in %.1f s" % wait, "RATE_LIMITED",
                            {"Retry-After": str(max(1, int(math.ceil(wait))))})
    if entry.scope and not (entry.open_on_loopback and hall.config.loopback and
                            sent_from_this_host(headers)):
        if principal is None:
            raise HallError(401, "a valid token is required (Authorization: Bearer <token>)%s"
                            % ("; without one, only programs on this host, sending to a "
                               "loopback name, are answered" if entry.open_on_loopback and
                               hall.config.loopback else ""),
                            "UNAUTHORIZED", {"WWW-Authenticate": 'Bearer realm="hall"'})
        if entry.scope not in principal.scopes:
            raise HallError(403, "this token lacks the %s scope" % entry.scope, "FORBIDDEN")
        if entry.scope == "admin" and principal.tenant and not entry.namespaced:
            raise HallError(403, "this token is limited to namespace %s; %s %s acts on the "
                            "whole hall" % (principal.tenant, method, entry.path),
                            "FORBIDDEN_NAMESPACE")
    if entry.request is not None and not _is_json_type(headers.get("Content-Type")):
        raise HallError(415, "request body must be application/json", "UNSUPPORTED_MEDIA_TYPE")
    query = {}
    if query_text:                              # (parse_qs costs a microsecond even for "")
        query = {k: v[0] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
    req = Request(method, path, query, headers, body, params, principal or ANONYMOUS, client)
    answer = entry.handler(hall, req)           # (status, payload[, headers])
    return answer[0], answer[1], answer[2] if len(answer) > 2 else {}


class DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose reads are bounded by deadlines, not by
    a per-recv timeout: a keep-alive connection may stay silent for
    ``idle_timeout`` between requests, and once a request starts its line,
    headers and body must arrive within ``request_timeout`` -- so a client
    that trickles one byte at a time (slow loris) is dropped in seconds.

    On plain sockets the kernel enforces the wait (SO_RCVTIMEO, re-armed only
    when the deadline comes nearer), which spares a poll() per read; TLS
    sockets use Python's socket timeout instead.  ``preread``: bytes already
    received (by the event loop that handed the connection over)."""

    def __init__(self, sock, idle_timeout, request_timeout, preread=b""):
        io.RawIOBase.__init__(self)
        self.sock = sock
        self.preread = preread
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.armed = None                       # the kernel receive timeout now set
        self.let_go = False                     # the hall stopped while it waited (let_go_if_idle)
        self._lock = threading.Lock()           # idle and let_go, against the stopping thread
        self.kernel = not isinstance(sock, ssl.SSLSocket) and _set_receive_timeout(
            sock, request_timeout)
        if self.kernel:
            self.armed = request_timeout
            sock.settimeout(None)               # blocking: no poll() before each recv
        self.await_request()

    def await_request(self):
        self.deadline = time.monotonic() + self.idle_timeout
        self.idle = True

    def begin_request(self):
        """A request has begun (its first bytes are in): True, unless the
        hall let the connection go first -- then it is not served at all."""
        with self._lock:
            if self.idle:
                if self.let_go:
                    return False
                self.idle = False
                self.deadline = time.monotonic() + self.request_timeout
            return True

    def let_go_if_idle(self):
        """(From the stopping thread.)  True if no request has begun since
        await_request: none will be served now."""
        with self._lock:
            self.let_go = self.let_go or self.idle and not self.preread
            return self.let_go

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.preread:
            if self.idle and not self.begin_request():
                return 0
            count = min(len(buffer), len(self.preread))
            buffer[:count] = self.preread[:count]
            self.preread = self.preread[count:]
        else:
            count = self._receive(buffer)
        if count and self.idle and not self.begin_request():
            return 0                            # (as if the client had closed)
        return count

    def _receive(self, buffer):
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the client took too long")
            try:
                if not self.kernel:
                    self.sock.settimeout(remaining)
                elif remaining < self.armed:
                    _set_receive_timeout(self.sock, remaining)
                    self.armed = remaining
                return self.sock.recv_into(buffer)
            except BlockingIOError:             # the kernel timeout ran out: check again
                if self.kernel and self.armed < remaining:
                    _set_receive_timeout(self.sock, remaining)
                    self.armed = remaining


def _set_receive_timeout(sock, seconds):
    """SO_RCVTIMEO/SO_SNDTIMEO on a plain socket; False where not supported."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, max(1, int((seconds - whole) * 1e6)))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return True
    except (OSError, AttributeError, struct.error):
        return False


class Headers(object):
    """Request headers: case-insensitive, repeated names kept in order."""

    __slots__ = ("_fields",)

    def __init__(self):
        self._fields = {}

    def add(self, name, value):
        self._fields.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self._fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        return self._fields.get(name.lower(), [])

    def __contains__(self, name):
        return name.lower() in self._fields


class BadRequest(Exception):
    """The request cannot be read: answer with this status and close."""

    def __init__(self, status, message, code=None):
        Exception.__init__(self, message)
        self.status, self.message, self.code = status, message, code


KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
REASONS = {status: phrase for status, (phrase, _) in BaseHTTPRequestHandler.responses.items()}
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,8})(?:;[^\r\n]*)?\r?\n$")
# RFC 9110 field names: a CR, NUL or space in one could hide a header from a proxy
_FIELD_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HTTP_DATE = [(None, "")]                # (second, Date header value): made once a second


def http_date():
    second = int(time.time())
    cached = _HTTP_DATE[0]                  # (one read: another thread may replace it)
    if cached[0] != second:
        cached = _HTTP_DATE[0] = (second, formatdate(second, usegmt=True))
    return cached[1]


SERVER_VERSION = "hall.py/" + __version__


_RANKED_MEMBER = '"candidate_workers_ranked": null'


def answer_json(payload):
    """JSON text of an answer, as json.dumps(payload).  A decision's
    candidate list brings its JSON along (RankedCandidates): the rest is
    encoded with null in its place, which is then replaced -- if no object
    or array opens before it, so that it is surely the decision's own
    member (inside an encoded string every quote is escaped)."""
    if type(payload) is PreparedDecision:
        return payload.json
    ranked = payload.get("candidate_workers_ranked") if type(payload) is dict else None
    if type(ranked) is not RankedCandidates:
        return _JSON(payload)
    text = _JSON(dict(payload, candidate_workers_ranked=None))
    at = text.find(_RANKED_MEMBER)
    if at < 0 or "{" in text[1:at] or "[" in text[:at]:
        return _JSON(payload)
    end = at + len(_RANKED_MEMBER)
    return text[:end - len("null")] + ranked.json + text[end:]


def response_bytes(config, status, payload, extra, request_headers, close, version="HTTP/1.1",
                   method="GET"):
    """The whole answer, head and body, to be sent with one write (so Nagle's
    algorithm and delayed ACKs do not add ~40 ms to every keep-alive request).
    ``payload`` is JSON-able, bytes already serialised, a Raw, or None."""
    content_type = "application/json; charset=utf-8"
    if payload is None:
        body = b""
    elif isinstance(payload, bytes):            # already serialised (cached answers)
        body = payload
    elif isinstance(payload, Raw):
        body, content_type = payload.body, payload.content_type
    else:
        body = answer_json(payload).encode("utf-8")
    lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "")),
             "Server: " + SERVER_VERSION, "Date: " + http_date()]
    if status != 204:
        lines.append("Content-Type: " + content_type)
        lines.append("Content-Length: %d" % len(body))
    origin = config.allowed_origin(
        request_headers.get("Origin") if request_headers is not None else None)
    if origin:
        lines.append("Access-Control-Allow-Origin: " + origin)
        if origin != "*":
            lines.append("Vary: Origin")
    for name, value in extra.items():
        lines.append("%s: %s" % (name, value))
    if close:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if method == "HEAD" else head + body


class HallRequestHandler(socketserver.StreamRequestHandler):
    """A connection served by a thread of its own: every TLS connection, and
    a plain one the event loop handed over (see EventLoop).  Socket I/O only:
    read each request of a keep-alive connection, answer it through the
    server, and write the answer in a single write.

    It reads HTTP/1.0 and 1.1 itself, strictly: header lines longer than
    HALL_MAX_HEADER_LINE or more than HALL_MAX_HEADERS of them are 431,
    anything malformed is 400 and closes."""

    server_version = SERVER_VERSION

    def setup(self):
        config = self.server.hall.config
        self.connection = self.request
        self.connection.settimeout(config.request_timeout)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()      # here, in this thread, not in accept()
        self.reader = DeadlineReader(self.connection, config.idle_timeout,
                                     config.request_timeout)
        self.rfile = io.BufferedReader(self.reader, 65536)
        self.method, self.target, self.version, self.headers = None, "", "HTTP/1.1", None
        with self.server._lock:                 # (drain counts a handed-over request throughout)
            self.reader.preread = self.server.handed_over.pop(self.connection, b"")
            self.server.thread_readers.add(self.reader)

    def finish(self):
        with self.server._lock:
            self.server.thread_readers.discard(self.reader)
        with contextlib.suppress(OSError):
            self.rfile.close()

    def handle(self):
        try:
            while self.handle_one_request():
                pass
        except (OSError, ssl.SSLError):         # the client went away, timed out, spoke bad TLS
            pass

    def handle_one_request(self):
        """Serve one request; True when the connection stays open for another."""
        self.reader.await_request()
        if self.server.stop_by is not None and not self.reader.preread:
            return False                        # stopping: no next request (let_idle_go)
        self.close_connection = False
        try:
            if not self.read_head():
                return False
        except BadRequest as exc:
            self.close_connection = True
            self.answer(exc.status, dict({"error": exc.message},
                                         **({"code": exc.code} if exc.code else {})), {})
            return False
        self.serve_request()
        return not self.close_connection

    def read_head(self):
        """Request line and headers; False at a clean end of the connection."""
        config = self.server.hall.config
        max_line = config.max_header_line
        line = self.rfile.readline(max_line + 1)
        if line in (b"\r\n", b"\n"):            # a stray line between requests is allowed
            line = self.rfile.readline(max_line + 1)
        if not line or not self.reader.begin_request():     # (already read, if pipelined)
            return False
        if len(line) > max_line:
            raise BadRequest(414, "the request line is too long")
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            raise BadRequest(400, "malformed request line")
        self.method, self.target, self.version = parts
        if self.version not in ("HTTP/1.1", "HTTP/1.0"):
            self.version = "HTTP/1.1"
            raise BadRequest(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        headers = Headers()
        for _ in range(config.max_headers + 1):
            line = self.rfile.readline(max_line + 1)
            if len(line) > max_line:
                raise BadRequest(431, "a header line is longer than %d bytes" % max_line)
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not _FIELD_NAME.match(name) or "\0" in value or \
                    "\r" in value.rstrip("\n")[:-1]:  # (RFC 9110: no CR or NUL in a field)
                raise BadRequest(400, "malformed header line")
            headers.add(name, value.strip())
        else:
            raise BadRequest(431, "more than %d header lines" % config.max_headers)
        self.headers = headers
        connection = (headers.get("Connection") or "").lower()
        self.close_connection = ("close" in connection if self.version == "HTTP/1.1"
                                 else "keep-alive" not in connection)
        if (self.version == "HTTP/1.1" and
                (headers.get("Expect") or "").lower() == "100-continue"):
            length = headers.get("Content-Length", "").strip()
            if length.isascii() and length.isdigit() and (len(length) > 15 or
                                                          int(length) > config.max_body):
                raise BadRequest(413, "request body is larger than %d bytes" % config.max_body,
                                 "PAYLOAD_TOO_LARGE")
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def serve_request(self):
        started = time.perf_counter()
        context = {}
        status, payload, headers = self.server.answer_request(
            self.method, self.target, self.headers,
            lambda: self.read_body(self.server.hall.config.max_body),
            self.client_address[0], context)
        if isinstance(payload, EventStream):
            with self.server._lock:             # (a stream is not waited for by a stop)
                self.server.thread_readers.discard(self.reader)
            self.stream(payload)
        else:
            self.answer(status, payload, headers)
        self.server.log_request(self.client_address[0], self.method, self.target, status,
                                started, context)

    def stream(self, events):
        """Write a server-sent-events answer chunk by chunk until it ends or
        the client goes; the connection closes afterwards."""
        self.close_connection = True
        origin = self.server.hall.config.allowed_origin(self.headers.get("Origin"))
        head = ("HTTP/1.1 200 OK\r\nServer: %s\r\nDate: %s\r\nContent-Type: %s\r\n"
                "Cache-Control: no-cache\r\nConnection: close\r\nX-Accel-Buffering: no\r\n%s\r\n"
                % (self.server_version, http_date(), events.content_type,
                   "Access-Control-Allow-Origin: %s\r\n" % origin if origin else ""))
        chunks = events.chunks()
        try:
            self.connection.sendall(head.encode("latin-1"))
            for chunk in chunks if self.method != "HEAD" else ():
                self.connection.sendall(chunk)
        except OSError:
            pass
        finally:
            chunks.close()
            self.server.hall.events.unsubscribe(events.subscription)    # (HEAD: never begun)

    def read_body(self, limit):
        """The request body, at most ``limit`` bytes (413 without reading more).

        Framing is read strictly -- Content-Length digits only and never two
        different ones, Transfer-Encoding exactly "chunked" -- so no request
        can hide another inside its body.  Any doubt closes the connection."""
        encodings = self.headers.get_all("Transfer-Encoding")
        lengths = set(self.headers.get_all("Content-Length"))
        try:
            if encodings:
                self.close_connection = self.close_connection or bool(lengths)
                if [e.strip().lower() for e in encodings] != ["chunked"]:
                    raise HallError(400, "only Transfer-Encoding: chunked is supported")
                return self.read_chunked(limit)
            if not lengths:
                return b""
            length = lengths.pop().strip()
            if lengths or not length.isdigit() or not length.isascii():
                raise HallError(400, "Content-Length must be one non-negative integer")
            size = int(length) if len(length) < 16 else limit + 1
            if size > limit:
                raise HallError(413, "request body is larger than %d bytes" % limit,
                                "PAYLOAD_TOO_LARGE")
            body = self.rfile.read(size)
            if len(body) < size:
                raise HallError(400, "request body is shorter than its Content-Length")
            return body
        except HallError:
            self.close_connection = True
            raise
        except OSError:                         # timed out or gone mid-body
            self.close_connection = True
            raise HallError(400, "the request body did not arrive in time")

    def read_chunked(self, limit):
        parts, total = [], 0
        while True:
            match = _CHUNK_SIZE.match(self.rfile.readline(4096))
            if not match:
                raise HallError(400, "malformed chunked body")
            size = int(match.group(1), 16)
            if size == 0:
                for _ in range(100):            # trailers, up to the blank line
                    if not self.rfile.readline(4096).strip():
                        return b"".join(parts)
                raise HallError(400, "malformed chunked body")
            total += size
            if total > limit:
                raise HallError(413, "request body is larger than %d bytes" % limit,
                                "PAYLOAD_TOO_LARGE")
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.readline(4096) not in (b"\r\n", b"\n"):
                raise HallError(400, "malformed chunked body")
            parts.append(chunk)

    def answer(self, status, payload, headers):
        """Write the whole response with one sendall (the last one of its
        connection while the hall stops, as the event loop does)."""
        if self.server.stop_by is not None or self.server.hall.stopping:
            self.close_connection = True
        try:
            self.connection.sendall(response_bytes(
                self.server.hall.config, status, payload, headers, self.headers,
                self.close_connection, self.version, self.method))
        except OSError:
            self.close_connection = True


class RateLimiter(object):
    """A token bucket per client (token id, or address when no token): ``rate``
    requests a second on average, bursts up to ``burst``.  Bounded memory."""

    def __init__(self, rate, burst, max_clients=10000):
        self.rate, self.burst, self.max_clients = float(rate), float(burst), max_clients
        self._buckets = {}
        self._lock = threading.Lock()

    def wait_time(self, client):
        """0 when the request may go ahead, else the seconds until it may."""
        moment = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, moment))
            tokens = min(self.burst, tokens + (moment - last) * self.rate)
            if len(self._buckets) >= self.max_clients and client not in self._buckets:
                self._buckets.clear()
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, moment)
                return 0.0
            self._buckets[client] = (tokens, moment)
            return (1 - tokens) / self.rate

    def refund(self, client):
        """Give back the request ``client`` was charged for: it is asked again."""
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, time.monotonic()))
            self._buckets[client] = (min(self.burst, tokens + 1), last)


UNLIMITED_PATHS = ("/health", "/healthz", "/ready", "/readyz")
_BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; "
                b"charset=utf-8\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 72\r\n"
                b"\r\n" + json.dumps({"error": "too many connections; retry shortly",
                                      "code": "BUSY"}).encode().ljust(72))


# accept() failing for want of a file descriptor (or of kernel memory) is
# retried after a pause, not at once: the connection stays queued.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_PAUSE_SECONDS = 0.1
_DESCRIPTOR_COMPLAINT = [None]                  # when it was last said


def _complain_out_of_descriptors(exc):
    if _DESCRIPTOR_COMPLAINT[0] is None or time.monotonic() - _DESCRIPTOR_COMPLAINT[0] > 10:
        _DESCRIPTOR_COMPLAINT[0] = time.monotonic()
        _complain("[hall-api] cannot accept connections: %s (raise the file limit, "
                  "ulimit -n, or lower HALL_MAX_CONNECTIONS)" % exc)


class HallHTTPServer(ThreadingHTTPServer):
    """A Hall's HTTP server: at most ``max_connections`` connections at once
    (more are answered 503 at once), a rate limit per client, and a count of
    requests in flight for a graceful stop.

    Plain HTTP is served by one EventLoop thread, which hands a connection to
    a thread of its own (HallRequestHandler) for anything but the hot paths;
    TLS is served a thread per connection throughout."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, hall, address, tls):
        """``tls``: the SSLContext to serve with (tls_context); None: plain HTTP."""
        self.hall = hall
        config = hall.config
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.loop = None                        # (server_close runs if the bind fails)
        self.stop_by = None                     # the stop's deadline (time.monotonic())
        ThreadingHTTPServer.__init__(self, address, HallRequestHandler)
        self.scheme = "http"
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
            self.scheme = "https"
        else:
            self.loop = EventLoop(self)
        rate = config.requests_per_second
        self.limiter = RateLimiter(rate, config.rate_burst or 2 * rate) if rate else None
        self.handed_over = {}                   # socket -> bytes the loop had read from it
        self.thread_readers = set()             # the DeadlineReader of each thread's connection
        self._lock = threading.Lock()
        self._connections = 0
        self._in_flight = 0                     # requests the event loop is answering
        self._thread = None

    def get_request(self):
        """(The thread-per-connection path, TLS.)  Out of descriptors: pause
        before the server's loop, which would find the listener ready again
        at once, tries again."""
        try:
            return ThreadingHTTPServer.get_request(self)
        except OSError as exc:
            if exc.errno in OUT_OF_DESCRIPTORS:
                _complain_out_of_descriptors(exc)
                time.sleep(ACCEPT_PAUSE_SECONDS)
            raise

    @property
    def url(self):
        host, port = self.server_address[:2]
        if ":" in host:
            host = "[%s]" % host
        return "%s://%s:%d" % (self.scheme, host, port)

    def serve_forever(self, poll_interval=0.5):
        if self.loop is None:
            ThreadingHTTPServer.serve_forever(self, poll_interval)
        else:
            self.loop.run()

    def shutdown(self):
        """Stop serving; returns once serve_forever has.  The stop has
        HALL_DRAIN_SECONDS from now (``stop_by``) for the requests in flight:
        the loop's drain, drain() and the store's close keep to it."""
        if self.stop_by is None:
            self.stop_by = time.monotonic() + self.hall.config.drain_seconds
        if self.loop is None:
            ThreadingHTTPServer.shutdown(self)
        else:
            self.loop.stop()

    def admit(self):
        """Count a new connection in, unless the cap is reached."""
        with self._lock:
            if self._connections >= self.hall.config.max_connections:
                return False
            self._connections += 1
            return True

    def let_go(self):
        with self._lock:
            self._connections -= 1

    def process_request(self, request, client_address):
        if not self.admit():
            with contextlib.suppress(OSError, ssl.SSLError):
                request.settimeout(0.2)
                if not isinstance(request, ssl.SSLSocket):
                    request.sendall(_BUSY_ANSWER)
            self.shutdown_request(request)
            return
        ThreadingHTTPServer.process_request(self, request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            ThreadingHTTPServer.process_request_thread(self, request, client_address)
        finally:
            self.handed_over.pop(request, None)
            self.let_go()

    def hand_over(self, sock, client_address, received):
        """Serve an admitted plain connection from a thread of its own,
        starting with the bytes already read from it."""
        sock.setblocking(True)
        self.handed_over[sock] = received
        threading.Thread(target=self.process_request_thread, args=(sock, client_address),
                         name="hall-connection", daemon=True).start()

    def answer_request(self, method, target, headers, read_body, client, context):
        """(status, payload, headers) for one request: ``dispatch``, with
        every refusal and fault turned into an answer."""
        hall = self.hall
        try:
            answer = dispatch(hall, method, target, headers, read_body(), client, self.limiter,
                              context)
        except MustWait:
            raise
        except Exception as exc:
            return self.failure_answer(exc)
        if hall.recovers_storage(method) and hall.store.may_wait():
            hall.storage_recovered()            # (the event loop: once its writes committed)
        return answer

    def failure_answer(self, exc):
        if not isinstance(exc, HallError):
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            return 500, {"error": "internal error"}, {}
        if isinstance(exc, Unavailable):
            self.hall.storage_fault(exc)
        return exc.status, exc.body(), exc.headers

    def log_request(self, client, method, target, status, started, context):
        """The request's metrics, and its access-log line."""
        hall = self.hall
        seconds = time.perf_counter() - started
        hall.metrics.observe_request(context.get("route", "unmatched"), method
                                     if method in KNOWN_METHODS else "other", status, seconds)
        if not hall.config.access_log:
            return
        principal = context.get("principal")
        entry = {"time": now_iso(), "client": client, "method": clean_id(method)[:20],
                 "path": clean_id(target)[:300], "status": status,
                 "ms": round(seconds * 1000, 2),
                 "token": principal.token_id if principal else None}
        if hall.config.log_format == "json":
            line = json.dumps(entry)
        else:
            line = '%(client)s - "%(method)s %(path)s" %(status)d %(ms).1fms' % entry + \
                " token=%s" % (entry["token"] or "-")
        sys.stderr.write(line + "\n")

    def server_close(self):
        ThreadingHTTPServer.server_close(self)
        if self.loop is not None and self.loop.stopped.is_set():
            self.loop.release_descriptors()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client gone or a bad TLS hello
            traceback.print_exc()               # is not a fault; the rest goes to the log

    def begin_request(self):
        with self._lock:
            self._in_flight += 1

    def end_request(self):
        with self._lock:
            self._in_flight -= 1

    def drain(self):
        """Wait, up to the stop's deadline, for the requests in flight (the
        event loop's, those it handed to a thread, and each thread's from its
        first byte until its answer is sent); the number that were cut off."""
        deadline = self.stop_by or time.monotonic() + self.hall.config.drain_seconds
        self.let_idle_go()
        while True:
            with self._lock:
                running = self._in_flight + len(self.handed_over) + sum(
                    not reader.idle or bool(reader.preread) for reader in self.thread_readers)
            if running == 0 or time.monotonic() >= deadline:
                return running + (self.loop.cut_off if self.loop is not None else 0)
            time.sleep(0.01)

    def let_idle_go(self):
        """End the connections threads serve that wait for their next
        request: each thread would otherwise live on to its idle timeout.
        (Shut both ways, under any TLS: a TLS socket shut only for reading
        answers the end it then reads with an alert; the client should see a
        plain close, as at an idle timeout.)"""
        with self._lock:
            readers = list(self.thread_readers)
        for reader in readers:
            if reader.let_go_if_idle():
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(reader.sock, socket.SHUT_RDWR)

    def start_background(self):
        self._thread = threading.Thread(target=self.serve_forever, name="hall-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()
        self.drain()
        if self._thread is not None:
            self._thread.join(5)


class HandOver(Exception):
    """The event loop does not serve this request itself: a thread will."""


class LoopConnection(object):
    """A plain-HTTP connection the event loop serves."""

    __slots__ = ("sock", "client", "inbox", "outbox", "deadline", "exchange", "closing",
                 "events", "head", "ended")

    def __init__(self, sock, client, deadline):
        self.sock, self.client, self.deadline = sock, client, deadline
        self.inbox = bytearray()                # received, not yet answered
        self.outbox = b""                       # the answer's bytes not yet sent
        self.exchange = None                    # the request waiting for its writes
        self.closing = False                    # close once the answer is sent
        self.events = 0                         # what the selector watches for
        self.head = None                        # a parsed head whose body is still coming
        self.ended = False                      # the client has sent all it will send

    @property
    def busy(self):
        return bool(self.inbox or self.outbox or self.exchange)


class Exchange(object):
    """One request the event loop answers, from dispatch to its last byte."""

    __slots__ = ("conn", "method", "target", "headers", "close", "started", "context",
                 "answer", "jobs", "encoded")

    def __init__(self, conn, method, target, headers, close):
        self.conn, self.method, self.target, self.headers = conn, method, target, headers
        self.close = close
        self.started = time.perf_counter()
        self.context = {}
        self.answer = None                      # (status, payload, headers)
        self.jobs = ()
        self.encoded = None                     # (answer, its bytes), made during the commit


class EventLoop(object):
    """Plain HTTP from one thread: accept, read, parse, answer, with no
    thread handing requests back and forth.

    It answers itself only the hot paths (the routes marked inline) asked in
    the plainest HTTP/1.1 -- one Content-Length, no chunks, no Expect.  For
    anything else it hands the connection, with the bytes already read, to a
    thread of its own (HallRequestHandler): that one reading of HTTP decides
    every doubtful case and every error.

    A request's log appends are collected, not written (Store.collecting),
    and the loop goes on to other connections.  When none has anything more
    for it, it commits all the appends collected meanwhile in one transaction
    (Store.commit_here) and only then sends their answers -- so many requests
    share one commit, and nothing is answered before it is durable.  The
    loop waits for that fsync, but never for a lock: when the database is
    busy the writer thread commits them instead, and tells the loop.  While
    SQLite syncs, the encoder thread makes the batch's answers (the COMMIT
    lets go of the interpreter): they are sent as made unless the commit's
    outcome changed them (a ``then`` never changes an answer).  A
    request that would wait in any other way (MustWait) is answered by a
    thread of its own, which gives the answer back for the loop to send."""

    SWEEP_SECONDS = 0.25                        # how often deadlines are checked
    MAX_HEAD = 65536                            # a longer head: the thread reads it
    MAX_PENDING = 64                            # appends to commit even while busy,
    MAX_PENDING_SECONDS = 0.005                 # or once the oldest waited this long

    def __init__(self, server):
        self.server = server
        self.hall = server.hall
        self.store = server.hall.store
        self.config = server.hall.config
        self.selector = selectors.DefaultSelector()
        self.connections = set()
        self.parked = []                        # exchanges waiting for their writes
        self.pending = []                       # collected appends not yet committed
        self.pending_since = 0.0
        self.in_threads = set()                 # exchanges a thread answers (MustWait)
        self.answered = queue.SimpleQueue()     # ... and has answered
        self.stopping = False
        self.cut_off = 0                        # requests the stop's deadline cut off
        self.accepting_again = None             # when, after running out of descriptors
        self.stopped = threading.Event()
        self.stopped.set()                      # until run() starts
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.encoder = None                     # the thread that makes answers ahead
        self.to_encode = queue.SimpleQueue()    # [exchanges] whose COMMIT is syncing; None: stop
        self.encoded = queue.SimpleQueue()      # ... and their answers are made

    def wake(self):
        """From any thread: have the loop look at its parked exchanges."""
        with contextlib.suppress(OSError):      # full: a wake-up is pending anyway
            self._wake_writer.send(b"\0")

    def stop(self):
        self.stopping = True
        self.wake()
        self.stopped.wait()

    def run(self):
        self.stopped.clear()
        with contextlib.suppress(HallError):
            self.hall.registry()                # built here, not by the first requests' threads
        listener = self.server.socket
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        self.selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        next_sweep, drain_until = 0.0, None
        encoder = threading.Thread(target=self.encode_ahead, name="hall-encoder", daemon=True)
        with contextlib.suppress(RuntimeError):   # out of threads: answers are made after
            encoder.start()
            self.encoder = encoder
        try:
            while True:
                if self.stopping and drain_until is None:
                    drain_until = self.server.stop_by or (time.monotonic() +
                                                          self.config.drain_seconds)
                    if self.accepting_again is None:
                        self.selector.unregister(listener)
                    self.accepting_again = None
                    listener.close()            # a client connecting now is refused at once,
                                                # not left in the backlog until the drain ends
                    for conn in list(self.connections):
                        if not conn.busy:
                            self.close(conn)
                if drain_until is not None and (time.monotonic() > drain_until or not (
                        self.parked or any(conn.busy for conn in self.connections))):
                    return
                timeout = 0 if self.pending else self.SWEEP_SECONDS
                if self.accepting_again is not None:
                    timeout = max(0, min(timeout, self.accepting_again - time.monotonic()))
                events = self.selector.select(timeout)
                if self.pending and (not events or len(self.pending) >= self.MAX_PENDING or
                                     time.monotonic() > self.pending_since +
                                     self.MAX_PENDING_SECONDS):
                    try:
                        self.commit()
                    except Exception:           # a fault here must not stop the loop
                        traceback.print_exc()
                for key, _ in events:
                    try:
                        self.ready(key.data, listener)
                    except Exception:           # a fault here must not stop the loop
                        traceback.print_exc()
                        if key.data in self.connections:
                            with contextlib.suppress(Exception):
                                self.close(key.data)
                moment = time.monotonic()
                if moment >= next_sweep:
                    next_sweep = moment + self.SWEEP_SECONDS
                    self.sweep(moment)
                if self.accepting_again is not None and moment >= self.accepting_again:
                    self.accepting_again = None
                    self.selector.register(listener, selectors.EVENT_READ, "accept")
        finally:
            if self.encoder is not None:
                self.to_encode.put(None)
                self.encoder = None
            for job in self.pending:            # never answered, but not lost either
                self.store._submit(job)
            for exchange in self.parked + list(self.in_threads):    # cut off by the deadline
                self.server.end_request()
                self.cut_off += exchange.conn is not None   # (not: writes nobody waits for)
            self.parked, self.in_threads = [], set()
            for conn in list(self.connections):
                self.close(conn)
            self.selector.close()
            self.stopped.set()

    def commit(self):
        jobs, self.pending = self.pending, []
        handed = False                          # to the encoder, once the COMMIT begins

        def meanwhile():
            nonlocal handed
            batch = set(jobs)
            self.to_encode.put([exchange for exchange in self.parked if exchange.conn is not None
                                and exchange.jobs and exchange.jobs[0] in batch])
            handed = True
        try:
            committed = self.store.commit_here(jobs, meanwhile if self.encoder else None)
        except Exception as exc:                # as the writer thread would
            self.store._abandon(jobs, exc)
            committed = True
        finally:
            if handed:                          # no exchange is touched while it works
                self.wait_for_encoder()
        if committed:
            self.settle()

    def wait_for_encoder(self):
        """Until the encoder has made what it was handed -- or, should that
        thread be gone, no longer hand it anything (rather than wait for ever)."""
        while True:
            try:
                return self.encoded.get(timeout=1.0)
            except queue.Empty:
                if not self.encoder.is_alive():
                    _complain("[hall-api] the encoder thread is gone: answers are made "
                              "after their commit")
                    self.encoder = None
                    return

    def encode_ahead(self):
        """The encoder thread: the answers of exchanges whose COMMIT is
        syncing, made meanwhile.  One that fails here is made (and fails)
        again by finish."""
        while True:
            exchanges = self.to_encode.get()
            if exchanges is None:
                return
            try:
                for exchange in exchanges:
                    with contextlib.suppress(Exception):
                        status, payload, headers = answer = exchange.answer
                        exchange.encoded = (answer, response_bytes(
                            self.config, status, payload, headers, exchange.headers,
                            exchange.close))
            finally:
                self.encoded.put(None)

    def collected(self, jobs):
        """Appends a request made: to be committed by the loop."""
        if jobs and not self.pending:
            self.pending_since = time.monotonic()
        self.pending.extend(jobs)

    def ready(self, what, listener):
        if what == "accept":
            self.accept(listener)
        elif what == "wake":
            with contextlib.suppress(OSError):
                self._wake_reader.recv(4096)
            self.settle()
        elif what.outbox:
            self.flush(what)
            if not what.outbox and what in self.connections:
                self.serve(what)
        else:
            self.receive(what)

    def release_descriptors(self):
        """Once it has stopped (or never ran): its wake-up pair and selector."""
        self._wake_reader.close()
        self._wake_writer.close()
        self.selector.close()

    # -- connections -----------------------------------------------------------

    def accept(self, listener):
        while True:
            try:
                sock, client = listener.accept()
            except OSError as exc:              # none waiting (or a failed accept)
                if exc.errno in OUT_OF_DESCRIPTORS:
                    # The connection stays queued and the listener readable:
                    # watched now, it would wake the loop again at once.
                    self.selector.unregister(listener)
                    self.accepting_again = time.monotonic() + ACCEPT_PAUSE_SECONDS
                    _complain_out_of_descriptors(exc)
                return
            if not self.server.admit():
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(_BUSY_ANSWER)
                sock.close()
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = LoopConnection(sock, client, time.monotonic() + self.config.idle_timeout)
            self.connections.add(conn)
            self.watch(conn, selectors.EVENT_READ)

    def watch(self, conn, events):
        """Have the selector watch the connection for ``events`` (0: not at all)."""
        if conn.events == events:
            return
        if not events:
            self.selector.unregister(conn.sock)
        elif not conn.events:
            self.selector.register(conn.sock, events, conn)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def close(self, conn):
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.watch(conn, 0)
        conn.sock.close()
        self.server.let_go()

    def hand_over(self, conn):
        self.watch(conn, 0)
        self.connections.discard(conn)
        try:
            self.server.hand_over(conn.sock, conn.client, bytes(conn.inbox))
        except Exception:                       # no thread to be had: drop it
            traceback.print_exc()
            self.server.handed_over.pop(conn.sock, None)
            conn.sock.close()
            self.server.let_go()

    def sweep(self, moment):
        """Drop connections past their deadline: idle too long, or a request
        (or the answer to it) taking longer than request_timeout."""
        for conn in [c for c in self.connections if c.deadline < moment and not c.exchange]:
            try:
                if conn.head is not None and not conn.outbox:
                    self.refuse_body(conn, "the request body did not arrive in time")
                else:
                    self.close(conn)
            except Exception:
                traceback.print_exc()
                self.close(conn)

    def refuse_body(self, conn, message):
        """400 for a request whose head came and whose body did not; then close."""
        method, target, headers, _ = conn.head
        conn.head = None
        del conn.inbox[:]
        exchange = Exchange(conn, method, target, headers, True)
        exchange.answer = (400, {"error": message}, {})
        self.server.begin_request()
        self.finish(exchange)

    def receive(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.exchange is not None:       # answer what it asked, then close
                conn.ended = True
                self.watch(conn, 0)
            elif conn.head is not None:
                self.refuse_body(conn, "request body is shorter than its Content-Length")
            else:
                self.close(conn)
            return
        if not conn.inbox:                      # a request has begun
            conn.deadline = time.monotonic() + self.config.request_timeout
        conn.inbox += data
        self.serve(conn)

    def flush(self, conn):
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self.sent(conn)

    def send(self, conn, data):
        conn.outbox = data
        conn.deadline = time.monotonic() + self.config.request_timeout
        self.flush(conn)
        if conn.outbox and conn in self.connections:
            self.watch(conn, selectors.EVENT_WRITE)

    def sent(self, conn):
        """The answer is out: close, or wait for the next request."""
        if conn.closing or self.stopping and not conn.inbox:
            self.close(conn)
        else:
            conn.deadline = time.monotonic() + (self.config.request_timeout if conn.inbox
                                                else self.config.idle_timeout)

    # -- requests ----------------------------------------------------------------

    def serve(self, conn):
        """Answer what the connection has sent, for as long as each request
        is answered at once; then watch it for what comes next."""
        while conn.inbox and not conn.exchange and not conn.outbox and not conn.closing \
                and conn in self.connections:
            try:
                request = self.parse(conn)
            except HandOver:
                self.hand_over(conn)
                return
            if request is None:
                break
            self.start(conn, *request)
        if conn not in self.connections:
            return
        if conn.ended:
            if not conn.exchange and not conn.outbox:
                self.close(conn)
            return
        # While a request waits for its writes the connection is still read
        # (to see the client leave), up to a bound for a pipelining one.
        self.watch(conn, selectors.EVENT_WRITE if conn.outbox else
                   0 if conn.exchange and len(conn.inbox) > self.MAX_HEAD
                   else selectors.EVENT_READ)

    def parse(self, conn):
        """(method, target, headers, body, close) of the first request in the
        inbox; None until all of it has arrived; HandOver if it is not one
        the loop answers itself."""
        inbox = conn.inbox
        end = inbox.find(b"\r\n\r\n")
        if end < 0 or inbox[:1] in (b"\r", b"\n"):
            if end >= 0 or len(inbox) > self.MAX_HEAD or \
                    inbox.count(b"\n") != inbox.count(b"\r\n"):   # a bare LF ends lines too
                raise HandOver()
            return None
        if conn.head is None:
            conn.head = self.parse_head(bytes(inbox[:end]))
        method, target, headers, size = conn.head
        if len(inbox) < end + 4 + size:
            return None
        body = bytes(inbox[end + 4:end + 4 + size])
        del inbox[:end + 4 + size]
        conn.head = None
        return method, target, headers, body, "close" in (headers.get("Connection") or "").lower()

    def parse_head(self, head):
        config = self.config
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or parts[2] != "HTTP/1.1" or len(lines) > config.max_headers or \
                len(lines[0]) + 2 > config.max_header_line:
            raise HandOver()
        method, target = parts[0], parts[1]
        methods = find_route(target.partition("?")[0])[0]
        entry = methods.get(method) if methods else None
        if entry is None or not entry.inline:
            raise HandOver()
        # No CR or LF but the line ends, no NUL, no field line too long.
        if "\0" in text or text.count("\r") != len(lines) - 1 or \
                text.count("\n") != len(lines) - 1 or \
                max(map(len, lines)) + 2 > config.max_header_line:
            raise HandOver()
        headers = Headers()
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not _FIELD_NAME.match(name):
                raise HandOver()
            headers.add(name, value.strip())
        if "Transfer-Encoding" in headers or "Expect" in headers:
            raise HandOver()
        lengths = headers.get_all("Content-Length")
        if not lengths:
            return method, target, headers, 0
        if len(lengths) > 1 or not lengths[0].isdigit() or not lengths[0].isascii() or \
                len(lengths[0]) > 15 or int(lengths[0]) > config.max_body:
            raise HandOver()
        return method, target, headers, int(lengths[0])

    def start(self, conn, method, target, headers, body, close):
        exchange = Exchange(conn, method, target, headers, close or self.stopping)
        self.server.begin_request()
        try:
            with self.store.collecting(self.wake) as jobs:
                exchange.answer = self.server.answer_request(
                    method, target, headers, lambda: body, conn.client[0], exchange.context)
        except MustWait:
            # It has to wait for something: a thread answers it, from the
            # start, and gives the answer back for the loop to send.
            if "charged" in exchange.context and self.server.limiter is not None:
                self.server.limiter.refund(exchange.context["charged"])
            self.in_background(jobs)            # (an alert raised on the way, say)
            exchange.context = {}
            exchange.answer = (500, {"error": "internal error"}, {})
            conn.exchange = exchange
            self.in_threads.add(exchange)
            threading.Thread(target=self.answer_in_thread, args=(exchange, body),
                             name="hall-request", daemon=True).start()
            return
        if jobs:
            exchange.jobs = jobs
            conn.exchange = exchange
            self.parked.append(exchange)
            self.collected(jobs)
        else:
            self.complete(exchange)

    def answer_in_thread(self, exchange, body):
        try:
            exchange.answer = self.server.answer_request(
                exchange.method, exchange.target, exchange.headers, lambda: body,
                exchange.conn.client[0], exchange.context)
        finally:
            self.answered.put(exchange)
            self.wake()

    def in_background(self, jobs):
        """Writes no answer waits for: their ``then`` runs once they committed."""
        if jobs:
            background = Exchange(None, None, None, None, False)
            background.jobs = jobs
            self.server.begin_request()
            self.parked.append(background)
            self.collected(jobs)

    def settle(self):
        """Send the answers threads made, and those of the parked exchanges
        whose writes have their outcome."""
        while True:
            try:
                exchange = self.answered.get_nowait()
            except queue.Empty:
                break
            self.in_threads.discard(exchange)
            self.go_on(exchange, self.finish)
        parked, self.parked = self.parked, []
        for exchange in parked:
            if any(job.done.locked() for job in exchange.jobs):
                self.parked.append(exchange)
            else:
                self.go_on(exchange, self.complete)

    def go_on(self, exchange, answer):
        """Answer the exchange, then serve what its connection sent meanwhile."""
        conn = exchange.conn
        try:
            answer(exchange)
            if conn is not None and conn in self.connections:
                self.serve(conn)
        except Exception:                       # answer the others all the same
            traceback.print_exc()
            if conn is not None:
                self.close(conn)

    def complete(self, exchange):
        """Answer as the handler would have, had it waited for its writes: a
        failed write is the answer (an alert's failure fails no request);
        otherwise the ``then`` of each runs, and the answer goes out."""
        answered = True
        try:
            failed = next((job.error for job in exchange.jobs
                           if job.error is not None and not job.best_effort), None)
            if failed is not None:
                with self.store.collecting(self.wake) as jobs:
                    exchange.answer = self.server.failure_answer(failed)
                self.in_background(jobs)        # the fault's alert: nobody waits for it
                return
            for job in exchange.jobs:
                if job.then is not None and job.error is None:
                    try:
                        job.then(job.result)
                    except Exception:           # committed all the same
                        traceback.print_exc()
            if self.hall.recovers_storage(exchange.method):
                with self.store.collecting(self.wake) as jobs:
                    self.hall.storage_recovered()
                if jobs:                        # answered once that alert is stored too
                    exchange.jobs, exchange.encoded = jobs, None    # (made anew, later)
                    exchange.conn.exchange = exchange
                    self.parked.append(exchange)
                    self.collected(jobs)
                    answered = False
        finally:
            if answered:
                self.finish(exchange)

    def finish(self, exchange):
        self.server.end_request()
        conn = exchange.conn
        if conn is None:
            return
        conn.exchange = None
        if conn not in self.connections:
            return
        status, payload, headers = exchange.answer
        conn.closing = exchange.close
        made = exchange.encoded
        self.send(conn, made[1] if made is not None and made[0] is exchange.answer else
                  response_bytes(self.config, status, payload, headers, exchange.headers,
                                 exchange.close))
        self.server.log_request(conn.client[0], exchange.method, exchange.target, status,
                                exchange.started, exchange.context)


def tls_context(config):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cannot load TLS certificate %s / key %s: %s"
                          % (config.tls_cert, config.tls_key, exc))
    return context


def check_can_listen(config, host, port):
    """Refuse what would stop a hall listening on host:port -- plain HTTP
    off loopback without leave, a certificate that does not load, an address
    in use -- before a start has made any file (database, keys).  Returns
    the TLS context to serve with (None: plain HTTP)."""
    if not is_loopback(host) and not config.tls_cert and not config.allow_plain_http:
        raise ConfigError("refusing to serve plain HTTP on %s, which is not a loopback address: "
                          "set HALL_TLS_CERT and HALL_TLS_KEY, or pass --allow-plain-http "
                          "when a TLS-terminating proxy is in front" % (host or "all addresses"))
    tls = tls_context(config) if config.tls_cert else None
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as the server does
        probe.bind((host, port))
    except OSError as exc:
        raise _cannot_listen(host, port, exc)
    finally:
        probe.close()
    return tls


def make_server(hall, host, port, tls=False):
    """The hall's server on host:port.  ``tls``: what check_can_listen
    returned, when the caller has checked already."""
    if tls is False:
        tls = check_can_listen(hall.config, host, port)
    if not is_loopback(host):                   # what is open on loopback follows the
        hall.config.host = host                 # address served, not the one configured
    try:
        return HallHTTPServer(hall, (host, port), tls)
    except OSError as exc:                      # (taken since the check)
        raise _cannot_listen(host, port, exc)


def _cannot_listen(host, port, exc):
    return ConfigError("cannot listen on %s:%s: %s" % (host, port, exc.strerror or exc))


###############################################################################
# 7. The Hall Monitor page
###############################################################################
#
# The dashboard at GET /: one page, its script and style inline, nothing
# fetched from anywhere but this hall (it works on a host with no network).
# It reads the same endpoints as any client -- /status, /dispatches, /workers,
# /alerts, /api/activity, /events -- and, for an admin session, approvals and
# safe mode.  Signed in, it holds an HttpOnly session cookie it cannot read
# and a CSRF token in a variable; nothing goes to localStorage.  The event
# stream runs in a worker made from a blob: URL, so that a page with a stream
# still counts as loaded (headless browsers wait for every open request).

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Hall Monitor</title>
<script type="application/json" id="deny-messages">__DENY_MESSAGES__</script>
<style>
/* Colours: light by default, dark when the viewer prefers it. */
:root { --bg:#f3f5f8; --card:#fff; --fg:#17202e; --muted:#4f5a6b; --line:#d5dbe3; --accent:#1f5fbf;
  --focus:#c2410c; --ok-bg:#e2f3e7; --ok-fg:#135c2e; --no-bg:#fde6e6; --no-fg:#8f1d1d; --warn-bg:#fff1d0;
  --warn-fg:#6e4300; --info-bg:#e5eefc; --info-fg:#1b4a8a; --bar:#5b8fd6; --deny:#c0392b; color-scheme: light dark; }
@media (prefers-color-scheme: dark) {
  :root { --bg:#11161d; --card:#1a212b; --fg:#e6ebf2; --muted:#a7b2c2; --line:#334050; --accent:#7fb0ff;
    --focus:#ffb347; --ok-bg:#163a24; --ok-fg:#9be3b4; --no-bg:#4a1c1c; --no-fg:#ffb4b4; --warn-bg:#47340c;
    --warn-fg:#ffd98a; --info-bg:#1b3050; --info-fg:#b3d0ff; --bar:#6d9ee6; --deny:#ff7b6b; }
}
* { box-sizing: border-box; }
[hidden], .error:empty { display: none !important; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; background: var(--bg);
  color: var(--fg); overflow-wrap: anywhere; }
:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem 1rem; padding: .7rem 1rem;
  background: var(--card); border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.2rem; margin: 0; }
#hall-id, #who { color: var(--muted); font-size: .9rem; }
.spacer { flex: 1; }
.pill { padding: .1rem .55rem; border-radius: 999px; font-size: .8rem; font-weight: 600; border: 1px solid var(--line); }
button, input, select { font: inherit; color: inherit; }
button { cursor: pointer; padding: .35rem .8rem; border-radius: 6px; border: 1px solid var(--line); background: var(--card); }
button:hover { border-color: var(--accent); }
button:disabled { opacity: .6; cursor: default; }
button.primary { background: var(--accent); color: var(--card); border-color: var(--accent); }
input, select { padding: .35rem .5rem; border: 1px solid var(--muted); border-radius: 6px; background: var(--card); min-width: 0; }
label { font-size: .85rem; color: var(--muted); display: flex; flex-direction: column; gap: .15rem; }
main { padding: 1rem; display: grid; gap: 1rem; max-width: 1400px; margin: 0 auto; }
#data-views { display: grid; gap: 1rem; grid-template-columns: minmax(0, 1fr); }
@media (min-width: 1000px) {
  #data-views { grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); }
  #tiles, #workers-card { grid-column: 1 / -1; }
}
.col { display: grid; gap: 1rem; align-content: start; min-width: 0; }
.card, .tile { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: .8rem 1rem; min-width: 0; }
.card h2 { font-size: 1rem; margin: 0 0 .6rem; display: flex; flex-wrap: wrap; gap: .5rem; align-items: baseline; }
.muted { color: var(--muted); }
.error { color: var(--no-fg); font-size: .9rem; margin: .3rem 0; }
#tiles { display: grid; gap: .8rem; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); }
.tile-label { display: block; color: var(--muted); font-size: .85rem; }
.tile-value { display: block; font-size: 1.8rem; font-weight: 700; font-variant-numeric: tabular-nums; }
#chart { width: 100%; height: auto; display: block; }
#chart text { fill: var(--muted); font-size: 11px; }
#chart .c-bar { fill: var(--bar); } #chart .c-grid { stroke: var(--line); }
#chart .c-line { fill: none; stroke: var(--deny); stroke-width: 2; } #chart .c-dot { fill: var(--deny); }
.filters, .row-actions, #signin { display: flex; flex-wrap: wrap; gap: .5rem; align-items: flex-end; margin: 0 0 .6rem; }
.filters label, .row-actions label, #signin label { flex: 1 1 9rem; }
.list { list-style: none; margin: 0; padding: 0; }
.list > li { padding: .35rem 0; }
.list > li + li { border-top: 1px solid var(--line); }
#feed, #alerts { max-height: 75vh; overflow-y: auto; }
#feed summary { cursor: pointer; display: flex; flex-wrap: wrap; gap: .15rem .7rem; align-items: baseline; }
#feed .cap { font-weight: 600; }
#feed li { border-left: 4px solid transparent; padding-left: .4rem; }
#feed li.denied { border-left-color: var(--deny); }
#feed li.new { animation: flash 2s ease-out; }
@keyframes flash { from { background: var(--info-bg); } to { background: transparent; } }
@media (prefers-reduced-motion: reduce) { #feed li.new { animation: none; } }
.badge { display: inline-block; min-width: 6.2rem; text-align: center; padding: 0 .45rem; border-radius: 4px;
  font-size: .8rem; font-weight: 700; text-transform: uppercase; }
#sm-state { min-width: 0; }
.allowed .badge, .badge.ok, .pill.live, button.approve { background: var(--ok-bg); color: var(--ok-fg); }
.denied .badge, .badge.bad, .level-critical .badge, button.reject, button.danger { background: var(--no-bg); color: var(--no-fg); }
.level-warning .badge, .level-warn .badge, .pill.polling { background: var(--warn-bg); color: var(--warn-fg); }
.level-info .badge { background: var(--info-bg); color: var(--info-fg); }
.kv { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .1rem .8rem; margin: .4rem 0; font-size: .88rem; }
.kv dt { color: var(--muted); }
.kv dd { margin: 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; white-space: nowrap; }
.chip { display: inline-block; background: var(--bg); border: 1px solid var(--line); border-radius: 4px;
  padding: 0 .3rem; margin: 0 .2rem .2rem 0; font-size: .8rem; }
/* phones: the workers table turns into one small card per worker */
@media (max-width: 600px) {
  .row-actions label { flex-basis: 100%; }          /* the note above, both buttons below */
  #workers thead { display: none; }
  #workers tr, #workers td { display: block; border: 0; padding: .1rem 0; }
  #workers tr { border-top: 1px solid var(--line); padding: .4rem 0; }
  #workers td::before { content: attr(data-label) ": "; color: var(--muted); }
}
#safe-mode[data-safe-mode="on"] { border: 2px solid var(--deny); }
</style>
</head>
<body>
<header>
  <h1>Hall Monitor</h1>
  <span id="hall-id"><span id="hall-name"></span> <span id="hall-version"></span></span>
  <span class="spacer"></span>
  <span id="stream-state" class="pill polling" role="status" aria-label="Update mode">polling</span>
  <span id="who" hidden></span>
  <button type="button" id="signin-toggle" aria-controls="session-panel" aria-expanded="false">Sign in</button>
  <button type="button" id="signout" hidden>Sign out</button>
</header>
<main>
  <section id="session-panel" class="card" aria-labelledby="signin-h" hidden>
    <h2 id="signin-h">Sign in</h2>
    <p id="signin-why" class="muted" hidden>This hall needs a token before it shows any data.</p>
    <form id="signin" autocomplete="off">
      <label for="token">API token <input id="token" type="password" autocomplete="off" spellcheck="false" required></label>
      <button type="submit" class="primary">Sign in</button>
    </form>
    <p id="signin-error" class="error" role="alert"></p>
  </section>
  <p id="load-error" class="error" role="status"></p>

  <div id="data-views" hidden>
    <section id="tiles" aria-label="Counts">
      <div class="tile"><span class="tile-label">Workers enrolled</span><span class="tile-value" data-field="workers_enrolled">-</span></div>
      <div class="tile"><span class="tile-label">Decisions total</span><span class="tile-value" data-field="decisions_total">-</span></div>
      <div class="tile"><span class="tile-label">Decisions today (UTC)</span><span class="tile-value" data-field="decisions_today">-</span></div>
      <div class="tile"><span class="tile-label">Denials today (UTC)</span><span class="tile-value" data-field="denials_today">-</span></div>
    </section>
    <div class="col">
      <section class="card" aria-labelledby="chart-h">
        <h2 id="chart-h">Activity, last hour <span class="muted">per minute</span></h2>
        <svg id="chart" viewBox="0 0 640 210" role="img" aria-labelledby="chart-title chart-desc">
          <title id="chart-title">Decisions and denials per minute, last hour</title><desc id="chart-desc">Loading.</desc>
        </svg>
      </section>
      <section class="card" aria-labelledby="feed-h">
        <h2 id="feed-h">Dispatch decisions <span class="muted" id="feed-count"></span></h2>
        <form id="filters" class="filters" role="search" aria-label="Filter decisions">
          <label for="f-tenant">Tenant <input id="f-tenant" list="tenant-list" placeholder="any"></label>
          <label for="f-cap">Capability <input id="f-cap" list="cap-list" placeholder="any"></label>
          <label for="f-outcome">Outcome <select id="f-outcome"><option value="all">all</option>
            <option value="allowed">allowed</option><option value="denied">denied</option></select></label>
          <button type="submit">Apply</button> <button type="button" id="f-clear">Clear</button>
        </form>
        <datalist id="tenant-list"></datalist><datalist id="cap-list"></datalist>
        <ol id="feed" class="list" tabindex="0" aria-label="Decisions, newest first"></ol>
        <p id="feed-empty" class="muted" hidden>No decisions match.</p>
      </section>
    </div>
    <div class="col">
      <div id="admin" class="col" hidden>
        <section id="safe-mode" class="card" data-safe-mode="off" aria-labelledby="sm-h">
          <h2 id="sm-h">Safe mode <span id="sm-state" class="badge ok">off</span></h2>
          <dl class="kv" id="sm-info"></dl>
          <form id="sm-form" class="row-actions">
            <label for="sm-reason">Reason <input id="sm-reason" maxlength="500"></label>
            <button type="submit" id="sm-toggle" class="danger">Enter safe mode</button>
          </form>
          <p id="sm-error" class="error" role="alert"></p>
        </section>
        <section class="card" aria-labelledby="ap-h">
          <h2 id="ap-h">Pending approvals <span class="muted" id="ap-count"></span></h2>
          <p id="ap-msg" class="muted" role="status"></p>
          <ul id="approvals" class="list"></ul>
        </section>
      </div>
      <section class="card" aria-labelledby="al-h">
        <h2 id="al-h">Alerts <span id="alert-counts" class="muted"></span></h2>
        <ul id="alerts" class="list" tabindex="0" aria-label="Alerts, newest first"></ul>
        <p id="alerts-empty" class="muted" hidden>No alerts.</p>
      </section>
    </div>
    <section id="workers-card" class="card" aria-labelledby="wk-h">
      <h2 id="wk-h">Workers <span class="muted" id="workers-count"></span></h2>
      <div class="scroll" tabindex="0" role="region" aria-label="Workers table">
        <table id="workers">
          <thead><tr><th scope="col">Worker</th><th scope="col">Species</th><th scope="col">Capabilities</th>
            <th scope="col">Risk tier</th><th scope="col">Enrolled</th><th scope="col">Status</th></tr></thead>
          <tbody></tbody>
        </table>
      </div>
    </section>
  </div>
</main>
<script>
'use strict';
/* Hall Monitor. All server data is untrusted: it only goes in via textContent and attributes. */
const $ = (id) => document.getElementById(id);
const CHECK = String.fromCharCode(10003), CROSS = String.fromCharCode(10007);
const FEED_MAX = 100, POLL_MS = 5000, RESYNC_MS = 60000;
let session = { signed_in: false, name: null, scopes: [], open_reads: true };
let csrf = null;                 /* in memory only, never persisted */
let status = null, activity = [], feedRows = [], alerts = [], safeOn = false, started = false;
let closeStream = null, streamToken = null, live = false, needResync = false;
let pollTimer = null, retryTimer = null, feedSeq = 0, uid = 0;

/* What the deny codes mean (dispatch rows carry only the code): the hall's
   own sentences, which it puts in the page as data. */
const DENY_TEXT = JSON.parse(document.getElementById('deny-messages').textContent || '{}');

/* ---------- small helpers ---------- */
function el(tag, attrs, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') n.className = v;
    else if (k === 'text') n.textContent = String(v);
    else n.setAttribute(k, String(v));
  }
  for (const c of kids) if (c !== null && c !== undefined && c !== false) n.append(c instanceof Node ? c : String(c));
  return n;
}
function sv(tag, attrs, text) {     /* an SVG element */
  const n = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = String(text);
  return n;
}
function clear(n) { while (n.firstChild) n.removeChild(n.firstChild); return n; }
function kv(pairs, dl) {            /* a <dl> of the pairs whose value is set */
  dl = clear(dl || el('dl', { class: 'kv' }));
  for (const [k, v] of pairs) if (v !== null && v !== undefined && v !== '') dl.append(el('dt', { text: k }), el('dd', {}, v));
  return dl;
}
const num = (v) => (typeof v === 'number' && isFinite(v)) ? v.toLocaleString() : '-';
const isDenied = (d) => d.denied === true || d.denied === 1 || d.denied === '1';
const code = (text) => el('code', { text: text });
function levelOf(level) {          /* keep only a-z, so it is safe as a class name */
  let out = '';
  for (const ch of String(level || 'info').toLowerCase()) if (ch >= 'a' && ch <= 'z') out += ch;
  return out || 'info';
}
/* ISO text -> Date; fractional seconds cut to 3 digits (the hall sends microseconds). */
function parseIso(s) {
  if (!s) return null;
  let t = String(s);
  const dot = t.indexOf('T') < 0 ? -1 : t.indexOf('.', t.indexOf('T'));
  if (dot > 0) {
    let end = dot + 1;
    while (end < t.length && t[end] >= '0' && t[end] <= '9') end++;
    t = t.slice(0, dot + 1) + (t.slice(dot + 1, end) + '000').slice(0, 3) + t.slice(end);
  }
  const d = new Date(t);
  return isNaN(d.getTime()) ? null : d;
}
/* <time>: local time as text, the UTC ISO value in datetime and title. */
function timeEl(iso, short) {
  const d = parseIso(iso);
  if (!d) return el('span', { class: 'muted', text: iso || '-' });
  const today = d.toDateString() === new Date().toDateString();
  return el('time', { datetime: d.toISOString(), title: String(iso), text: short && today ? d.toLocaleTimeString() : d.toLocaleString() });
}

/* ---------- API: JSON both ways; state changes carry the CSRF token ---------- */
async function api(path, method, body) {
  const init = { method: method || 'GET', headers: { Accept: 'application/json' }, credentials: 'same-origin', cache: 'no-store' };
  if (init.method !== 'GET') {
    init.headers['Content-Type'] = 'application/json';
    if (csrf) init.headers['X-CSRF-Token'] = csrf;
    if (body !== undefined) init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const err = new Error((data && data.error) || ('HTTP ' + res.status));
    err.status = res.status; err.code = data && data.code;
    throw err;
  }
  return data;
}
function loadFailed(what, e) {
  if (e.status === 401) checkSession();            /* the session may have ended */
  $('load-error').textContent = 'Could not load ' + what + ': ' + (e.message || 'network error');
}

/* ---------- session ---------- */
const canRead = () => session.open_reads || session.signed_in;
const isAdmin = () => session.signed_in && session.scopes.indexOf('admin') >= 0;
async function checkSession() {
  try { applySession(await api('/api/session')); }
  catch (e) { applySession({ signed_in: false, scopes: [], open_reads: e.status !== 401 }); }   /* 404: an older hall */
}
function applySession(s) {
  const key = (x) => JSON.stringify([x.signed_in, x.name, x.scopes]);
  const before = key(session);
  session = { signed_in: !!s.signed_in, name: s.name || null, scopes: s.scopes || [], open_reads: s.open_reads !== false };
  csrf = session.signed_in ? (s.csrf || null) : null;
  $('who').hidden = $('signout').hidden = !session.signed_in;
  $('who').textContent = session.signed_in ? 'Signed in as ' + (session.name || '?') + ' (' + session.scopes.join(', ') + ')' : '';
  $('signin-toggle').hidden = session.signed_in || !session.open_reads;
  $('signin-why').hidden = session.open_reads;
  if (session.signed_in || !session.open_reads) $('session-panel').hidden = session.signed_in;
  $('signin-toggle').setAttribute('aria-expanded', String(!$('session-panel').hidden));
  $('data-views').hidden = !canRead();
  $('admin').hidden = !isAdmin();
  if (!canRead()) { stopStream(); stopPolling(); setStreamState('off'); started = false; return; }
  if (!started || before !== key(session)) { started = true; refreshAll(); startStream(); }
}
async function onSignIn(ev) {
  ev.preventDefault();
  const token = $('token').value.trim(), btn = ev.target.querySelector('button');
  $('token').value = '';                             /* the token is never kept */
  $('signin-error').textContent = '';
  if (!token) { $('signin-error').textContent = 'Enter a token.'; return; }
  btn.disabled = true;
  try { applySession(await api('/api/session', 'POST', { token: token })); }
  catch (e) { $('signin-error').textContent = (e.status === 401 ? 'Token not accepted: ' : 'Sign-in failed: ') + e.message; }
  finally { btn.disabled = false; }
}
async function onSignOut() {
  $('signout').disabled = true;
  try { applySession(await api('/api/session', 'DELETE')); }
  catch (e) { $('load-error').textContent = 'Sign-out failed: ' + e.message; checkSession(); }
  finally { $('signout').disabled = false; }
}

/* ---------- status tiles ---------- */
async function loadStatus() {
  try { status = await api('/status'); renderStatus(); } catch (e) { loadFailed('status', e); }
}
function renderStatus() {
  for (const n of document.querySelectorAll('#tiles [data-field]')) n.textContent = num(status[n.getAttribute('data-field')]);
  $('hall-name').textContent = status.hall_name || 'hall';
  $('hall-version').textContent = status.hall_version ? 'v' + status.hall_version : '';
}

/* ---------- activity chart (inline SVG) ---------- */
async function loadActivity() {
  try { activity = ((await api('/api/activity')) || {}).minutes || []; renderChart(); }
  catch (e) { loadFailed('activity', e); if (!activity.length) renderChart(); }
}
function minuteKey(iso) { const d = parseIso(iso); return d ? Math.floor(d.getTime() / 60000) * 60000 : null; }
function bumpChart(d) {            /* count a live decision in its minute, adding minutes as time moves on */
  const k = minuteKey(d.decided_at);
  if (k === null || !activity.length) return;
  let last = minuteKey(activity[activity.length - 1].minute);
  for (let i = 0; last !== null && last < k && i < 60; i++) {
    last += 60000;
    activity.push({ minute: new Date(last).toISOString(), decisions: 0, denied: 0 });
  }
  activity = activity.slice(-60);
  const slot = activity.find((m) => minuteKey(m.minute) === k);
  if (!slot) return;
  slot.decisions = (slot.decisions || 0) + 1;
  if (isDenied(d)) slot.denied = (slot.denied || 0) + 1;
  renderChart();
}
function niceMax(v) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(v, 1))));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return Math.max(m * p, 5);
  return v;
}
function hhmm(iso) { const d = parseIso(iso); return d ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) : ''; }
function renderChart() {
  const svg = clear($('chart'));
  /* drawn at its on-screen width, so the text stays readable on phones */
  const W = Math.max(300, Math.round(svg.getBoundingClientRect().width) || 640), H = 210;
  const L = 40, R = 10, T = 28, B = 26, pw = W - L - R, ph = H - T - B;
  svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
  const val = (m, f) => Number(m[f]) || 0;
  let total = 0, denied = 0, peak = activity[0];
  for (const m of activity) { total += val(m, 'decisions'); denied += val(m, 'denied'); if (val(m, 'decisions') > val(peak, 'decisions')) peak = m; }
  svg.append(sv('title', { id: 'chart-title' }, 'Decisions and denials per minute, last hour'));
  svg.append(sv('desc', { id: 'chart-desc' }, !activity.length ? 'No activity data.' : 'Last ' + activity.length + ' minutes: ' + total +
    ' decisions, ' + denied + ' denied. Busiest minute ' + hhmm(peak.minute) + ' with ' + val(peak, 'decisions') + ' decisions.'));
  const max = niceMax(Math.max(0, ...activity.map((m) => val(m, 'decisions'))));
  const y = (v) => T + ph - (v / max) * ph, bw = pw / Math.max(activity.length, 1), cx = (i) => L + i * bw + bw / 2;
  for (const v of [0, max / 2, max]) {                /* grid lines, y labels */
    svg.append(sv('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'c-grid' }));
    svg.append(sv('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, Number.isInteger(v) ? v : v.toFixed(1)));
  }
  activity.forEach((m, i) => {                        /* decisions: bars */
    const bar = sv('rect', { x: L + i * bw + bw * 0.1, y: y(val(m, 'decisions')), width: bw * 0.8, height: y(0) - y(val(m, 'decisions')), class: 'c-bar' });
    bar.append(sv('title', {}, hhmm(m.minute) + ': ' + val(m, 'decisions') + ' decisions, ' + val(m, 'denied') + ' denied'));
    svg.append(bar);
  });
  if (activity.length) {                              /* denials: a line with dots */
    svg.append(sv('polyline', { points: activity.map((m, i) => cx(i).toFixed(1) + ',' + y(val(m, 'denied')).toFixed(1)).join(' '), class: 'c-line' }));
    activity.forEach((m, i) => { if (val(m, 'denied')) svg.append(sv('circle', { cx: cx(i), cy: y(val(m, 'denied')), r: 2.8, class: 'c-dot' })); });
    const mid = Math.floor(activity.length / 2), last = activity.length - 1;   /* x labels */
    svg.append(sv('text', { x: L, y: H - 8 }, hhmm(activity[0].minute)));
    svg.append(sv('text', { x: cx(mid), y: H - 8, 'text-anchor': 'middle' }, hhmm(activity[mid].minute)));
    svg.append(sv('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, hhmm(activity[last].minute) + ' (now)'));
  }
  svg.append(sv('rect', { x: L, y: 6, width: 12, height: 10, class: 'c-bar' }), sv('text', { x: L + 17, y: 15 }, 'decisions'));   /* legend */
  svg.append(sv('line', { x1: L + 95, x2: L + 115, y1: 11, y2: 11, class: 'c-line' }), sv('circle', { cx: L + 105, cy: 11, r: 2.8, class: 'c-dot' }));
  svg.append(sv('text', { x: L + 121, y: 15 }, 'denied'));
}

/* ---------- dispatch feed ---------- */
function filters() { return { tenant: $('f-tenant').value.trim(), cap: $('f-cap').value.trim(), outcome: $('f-outcome').value }; }
function passes(d, f) {
  return (!f.tenant || d.tenant_id === f.tenant) && (!f.cap || d.capability_id === f.cap) &&
    (f.outcome === 'all' || (f.outcome === 'denied') === isDenied(d));
}
async function loadDispatches() {
  const f = filters(), q = new URLSearchParams({ limit: '50' }), seq = ++feedSeq;
  if (f.tenant) q.set('tenant_id', f.tenant);
  if (f.cap) q.set('capability_id', f.cap);
  if (f.outcome !== 'all') q.set('denied', f.outcome === 'denied' ? '1' : '0');
  try {
    const r = await api('/dispatches?' + q.toString());
    if (seq !== feedSeq) return;                      /* a newer query superseded this one */
    feedRows = (r && r.dispatches) || [];
    renderFeed();
  } catch (e) { loadFailed('decisions', e); }
}
const denyTitle = (d) => (d.deny_reason || 'denied') + (DENY_TEXT[d.deny_reason] ? ': ' + DENY_TEXT[d.deny_reason] : '');
function decisionItem(d, fresh) {
  const denied = isDenied(d);
  const summary = el('summary', { title: denied ? denyTitle(d) : 'allowed, on ' + (d.selected_worker || '?') },
    el('span', { class: 'badge', text: denied ? CROSS + ' denied' : CHECK + ' allowed' }), timeEl(d.decided_at, true),
    el('span', { class: 'cap', text: d.capability_id || '-' }), el('span', { class: 'muted', text: (d.tenant_id || '-') + ' / ' + (d.env || '-') }),
    denied ? code(d.deny_reason || '') : el('span', { class: 'muted', text: d.selected_worker ? 'on ' + d.selected_worker : '' }));
  const body = kv([['Outcome', denied ? 'denied' : 'allowed'], ['Deny code', denied ? code(d.deny_reason || '-') : null],
    ['Reason', denied ? (DENY_TEXT[d.deny_reason] || 'See the deny code.') : null], ['Decision', code(d.decision_id)],
    ['Decided', timeEl(d.decided_at)], ['Tenant', d.tenant_id], ['Capability', d.capability_id], ['Env', d.env],
    ['Worker', d.selected_worker], ['Blast score', d.blast_score], ['Artifact', d.artifact_hash ? code(d.artifact_hash) : null], ['Source', d.source]]);
  return el('li', { class: 'decision ' + (denied ? 'denied' : 'allowed') + (fresh ? ' new' : ''), 'data-decision-id': d.decision_id },
    el('details', {}, summary, body));
}
function renderFeed() {            /* keeps rows that were open (and focus) across refreshes */
  const feed = $('feed'), idOf = (n) => n.closest('li').getAttribute('data-decision-id');
  const open = new Set(Array.from(feed.querySelectorAll('details[open]')).map(idOf));
  const focused = feed.contains(document.activeElement) && document.activeElement !== feed ? idOf(document.activeElement) : null;
  clear(feed);
  for (const d of feedRows) {
    const li = decisionItem(d, false);
    li.firstChild.open = open.has(d.decision_id);
    feed.append(li);
    if (d.decision_id === focused) li.querySelector('summary').focus();
  }
  afterFeedChange();
}
function afterFeedChange() {
  $('feed-empty').hidden = feedRows.length > 0;
  $('feed-count').textContent = feedRows.length ? '(' + feedRows.length + ' shown, newest first)' : '';
  for (const [id, field] of [['tenant-list', 'tenant_id'], ['cap-list', 'capability_id']]) {   /* filter suggestions */
    const list = clear($(id));
    for (const v of Array.from(new Set(feedRows.map((d) => d[field]).filter(Boolean))).sort()) list.append(el('option', { value: v }));
  }
}
function onDecision(d) {
  if (!d.decision_id) return;
  if (status) {                                       /* bump the tiles without a refetch */
    status.decisions_total = (status.decisions_total || 0) + 1;
    status.decisions_today = (status.decisions_today || 0) + 1;
    if (isDenied(d)) status.denials_today = (status.denials_today || 0) + 1;
    renderStatus();
  }
  bumpChart(d);
  if (!passes(d, filters()) || feedRows.some((r) => r.decision_id === d.decision_id)) return;
  feedRows.unshift(d);
  $('feed').insertBefore(decisionItem(d, true), $('feed').firstChild);
  while (feedRows.length > FEED_MAX) { feedRows.pop(); $('feed').lastChild.remove(); }
  afterFeedChange();
}

/* ---------- alerts ---------- */
async function loadAlerts() {
  try { alerts = ((await api('/alerts')) || {}).alerts || []; renderAlerts(); } catch (e) { loadFailed('alerts', e); }
}
const RANK = { critical: 0, warning: 1, warn: 1, info: 2 };
function renderAlerts() {
  const list = clear($('alerts')), counts = {};
  for (const a of alerts) {
    const lv = levelOf(a.level), where = [a.worker_id && 'worker ' + a.worker_id, a.capability_id && 'capability ' + a.capability_id].filter(Boolean);
    counts[lv] = (counts[lv] || 0) + 1;
    list.append(el('li', { class: 'alert level-' + lv, 'data-alert-id': a.alert_id },
      el('div', {}, el('span', { class: 'badge', text: lv }), ' ', code(a.code || ''), ' ', el('small', { class: 'muted' }, timeEl(a.created_at, true))),
      el('div', { text: a.message || '' }), where.length ? el('small', { class: 'muted', text: where.join(' / ') }) : null));
  }
  $('alerts-empty').hidden = alerts.length > 0;
  const rank = (l) => (l in RANK ? RANK[l] : 3);
  $('alert-counts').textContent = Object.keys(counts).sort((a, b) => rank(a) - rank(b)).map((k) => counts[k] + ' ' + k).join(', ');
}
function onAlert(a) {
  if (!a.alert_id || alerts.some((x) => x.alert_id === a.alert_id)) return;
  alerts = [a].concat(alerts).slice(0, 50);
  renderAlerts();
}

/* ---------- workers ---------- */
async function loadWorkers() {
  try { renderWorkers(((await api('/workers')) || {}).workers || []); } catch (e) { loadFailed('workers', e); }
}
function renderWorkers(list) {
  const body = clear($('workers').tBodies[0]);
  const td = (label, ...kids) => el('td', { 'data-label': label }, ...kids);
  for (const w of list) {
    body.append(el('tr', { 'data-worker-id': w.worker_id }, td('Worker', code(w.worker_id)), td('Species', w.worker_species_id || '-'),
      td('Capabilities', ...(w.capabilities || []).map((c) => el('span', { class: 'chip', text: c }))),
      td('Risk tier', w.risk_tier || '-'), td('Enrolled', timeEl(w.enrolled_at)), td('Status', w.status || '-')));
  }
  if (!list.length) body.append(el('tr', {}, el('td', { colspan: 6, class: 'muted', text: 'No workers enrolled.' })));
  $('workers-count').textContent = '(' + list.length + ')';
}

/* ---------- admin: approvals ---------- */
let shownApprovals = null;
async function loadApprovals() {
  if (!isAdmin()) return;
  try { renderApprovals(((await api('/api/approvals?status=pending')) || {}).approvals || []); }
  catch (e) { $('ap-msg').textContent = 'Could not load approvals: ' + e.message; }
}
function renderApprovals(list) {
  const ids = list.map((a) => a.approval_id).join(' ');
  if (ids === shownApprovals) return;                 /* unchanged: keep notes being typed */
  shownApprovals = ids;
  const ul = clear($('approvals'));
  for (const a of list) {
    const id = 'note-' + (++uid), err = el('p', { class: 'error', role: 'alert' }), note = el('input', { id: id, maxlength: 500 });
    const ok = el('button', { type: 'button', class: 'approve', text: 'Approve' });
    const no = el('button', { type: 'button', class: 'reject', text: 'Reject' });
    const act = async (verb) => {
      ok.disabled = no.disabled = true; err.textContent = '';
      try {
        await api('/api/approvals/' + encodeURIComponent(a.approval_id) + '/' + verb, 'POST', note.value.trim() ? { reason: note.value.trim() } : {});
        $('ap-msg').textContent = (verb === 'approve' ? 'Approved ' : 'Rejected ') + (a.capability_id || a.approval_id) + '.';
        loadApprovals();
      } catch (e) { err.textContent = e.message + (e.code ? ' (' + e.code + ')' : ''); ok.disabled = no.disabled = false; }
    };
    ok.addEventListener('click', () => act('approve'));
    no.addEventListener('click', () => act('reject'));
    ul.append(el('li', { 'data-approval-id': a.approval_id },
      el('div', {}, el('strong', { text: a.capability_id || '-' }), ' ', el('span', { class: 'muted', text: [a.tenant_id, a.env, a.data_label].filter(Boolean).join(' / ') })),
      kv([['Deny code', a.deny_code ? code(a.deny_code) : null], ['Reason', a.reason], ['Requested', timeEl(a.created_at)],
        ['Expires', timeEl(a.expires_at)], ['Approval', code(a.approval_id)]]),
      el('div', { class: 'row-actions' }, el('label', { for: id }, 'Note (optional)', note), ok, no), err));
  }
  if (!list.length) ul.append(el('li', { class: 'muted', text: 'Nothing waiting.' }));
  $('ap-count').textContent = '(' + list.length + ')';
}

/* ---------- admin: safe mode ---------- */
async function loadSafeMode() {
  if (!isAdmin()) return;
  try { renderSafeMode(await api('/api/safe-mode')); } catch (e) { $('sm-error').textContent = 'Could not load safe mode: ' + e.message; }
}
function renderSafeMode(s) {
  safeOn = !!s.safe_mode;
  $('safe-mode').setAttribute('data-safe-mode', safeOn ? 'on' : 'off');
  $('sm-state').textContent = safeOn ? 'on: every route is denied' : 'off';
  $('sm-state').className = 'badge ' + (safeOn ? 'bad' : 'ok');
  kv([['Reason', s.reason], ['Since', s.since ? timeEl(s.since) : null], ['By', s.by]], $('sm-info'));
  $('sm-toggle').textContent = safeOn ? 'Leave safe mode' : 'Enter safe mode';
  $('sm-toggle').className = safeOn ? 'primary' : 'danger';
  $('sm-reason').placeholder = safeOn ? 'optional' : 'required';
}
async function onSafeMode(ev) {
  ev.preventDefault();
  const reason = $('sm-reason').value.trim();
  $('sm-error').textContent = '';
  if (!safeOn && !reason) { $('sm-error').textContent = 'A reason is required to enter safe mode.'; $('sm-reason').focus(); return; }
  $('sm-toggle').disabled = true;
  try {
    renderSafeMode(await api('/api/safe-mode/' + (safeOn ? 'exit' : 'enter'), 'POST', reason ? { reason: reason } : {}));
    $('sm-reason').value = '';
  } catch (e) { $('sm-error').textContent = e.message; }
  finally { $('sm-toggle').disabled = false; }
}

/* ---------- live stream, with polling as the fallback ---------- */
function setStreamState(s) {                       /* live | polling | off */
  const n = $('stream-state');
  live = s === 'live'; n.textContent = s; n.className = 'pill ' + s;
  n.title = live ? 'Receiving server-sent events' : s === 'polling' ? 'Refreshing every 5 seconds' : 'Not receiving data';
}
function refreshAll() {
  loadStatus(); loadDispatches(); loadAlerts(); loadWorkers(); loadActivity();
  if (isAdmin()) { loadApprovals(); loadSafeMode(); }
}
function startPolling() { if (!pollTimer) pollTimer = setInterval(() => { $('load-error').textContent = ''; refreshAll(); }, POLL_MS); }
function stopPolling() { clearInterval(pollTimer); pollTimer = null; }
function stopStream() {
  clearTimeout(retryTimer); retryTimer = null; streamToken = null;
  if (closeStream) { const close = closeStream; closeStream = null; close(); }
}
function fallBack(retryMs) {                          /* stream lost: poll now, retry the stream later */
  stopStream();
  needResync = true;
  setStreamState('polling');
  refreshAll();
  startPolling();
  retryTimer = setTimeout(startStream, retryMs);
}
/* The EventSource runs in a tiny worker built from this function's source, so the
   never-ending stream does not keep the page itself "loading" (tools that wait for
   the network to go idle, like headless Chromium's --virtual-time-budget, would
   wait forever). Without a usable Worker (old browser, or a CSP without
   worker-src blob:) it runs on the page instead. */
function streamWorker() {
  self.onmessage = (m) => {
    const es = new EventSource(m.data.url);
    es.onopen = () => self.postMessage({ kind: 'open' });
    es.onerror = () => self.postMessage({ kind: 'error' });
    for (const k of m.data.kinds) es.addEventListener(k, (e) => self.postMessage({ kind: k, data: e.data }));
  };
}
let useWorker = typeof Worker === 'function' && typeof Blob === 'function', workerUrl = null;
function openSource(url, kinds, deliver) {          /* -> a function that closes the stream */
  if (useWorker) {
    try {
      workerUrl = workerUrl || URL.createObjectURL(new Blob(['(' + streamWorker.toString() + ')();'], { type: 'text/javascript' }));
      const w = new Worker(workerUrl);
      w.onmessage = (m) => deliver(m.data.kind, m.data.data);
      w.onerror = (e) => { e.preventDefault(); useWorker = false; deliver('noworker'); };   /* e.g. CSP */
      w.postMessage({ url: url, kinds: kinds });
      return () => w.terminate();
    } catch (e) { useWorker = false; }
  }
  const es = new EventSource(url);
  es.onopen = () => deliver('open');
  es.onerror = () => deliver('error');
  for (const k of kinds) es.addEventListener(k, (e) => deliver(k, e.data));
  return () => es.close();
}
const HANDLERS = {
  decision: onDecision, alert: onAlert,
  enrollment: () => { loadWorkers(); loadStatus(); },
  admin: () => { loadApprovals(); loadSafeMode(); }
};
function startStream() {
  stopStream();
  if (!canRead()) return;
  setStreamState('polling');                          /* until the stream is open */
  startPolling();
  if (typeof EventSource !== 'function') return;
  const token = streamToken = {};
  const deliver = (kind, text) => {
    if (streamToken !== token) return;                /* from a stream we closed */
    if (kind === 'open') {
      stopPolling();
      setStreamState('live');
      if (needResync) { needResync = false; refreshAll(); }
    } else if (kind === 'noworker') startStream();    /* again, on the page this time */
    else if (kind === 'error') fallBack(15000);
    else if (kind === 'dropped') fallBack(3000);
    else if (HANDLERS[kind]) {
      let data = null;
      try { data = JSON.parse(text); } catch (e) { return; }
      if (data && typeof data === 'object') HANDLERS[kind](data);
    }
  };
  const url = new URL('/events?types=' + Object.keys(HANDLERS).join(','), location.href).href;
  try { closeStream = openSource(url, Object.keys(HANDLERS).concat(['dropped']), deliver); } catch (e) { fallBack(30000); }
}

/* ---------- wiring ---------- */
$('signin').addEventListener('submit', onSignIn);
$('signout').addEventListener('click', onSignOut);
$('signin-toggle').addEventListener('click', () => {
  const panel = $('session-panel');
  panel.hidden = !panel.hidden;
  $('signin-toggle').setAttribute('aria-expanded', String(!panel.hidden));
  if (!panel.hidden) $('token').focus();
});
$('filters').addEventListener('submit', (ev) => { ev.preventDefault(); loadDispatches(); });
$('f-outcome').addEventListener('change', loadDispatches);
$('f-clear').addEventListener('click', () => { $('f-tenant').value = $('f-cap').value = ''; $('f-outcome').value = 'all'; loadDispatches(); });
$('sm-form').addEventListener('submit', onSafeMode);
/* while live, resync the counts and the chart now and then (day rollover, idle minutes) */
setInterval(() => { if (live) { loadStatus(); loadActivity(); } }, RESYNC_MS);
let chartWidth = 0;              /* redraw the chart when its width changes (outside the observer callback) */
if (typeof ResizeObserver === 'function') new ResizeObserver((entries) => {
  const w = Math.round(entries[0].contentRect.width);
  if (w && w !== chartWidth) { chartWidth = w; requestAnimationFrame(() => { if (activity.length) renderChart(); }); }
}).observe($('chart'));
checkSession();
</script>
</body>
</html>
"""


def _inline_hashes(html, tag):
    """The CSP source of each inline <tag> block: the page may run its own
    script and style and nothing else."""
    return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(
        block.encode("utf-8")).digest()).decode("ascii")
        for block in re.findall(r"<%s>(.*?)</%s>" % (tag, tag), html, re.S))


# The deny codes' sentences go in as data (a JSON block, which is not run).
DASHBOARD_PAGE = DASHBOARD_HTML.replace("__DENY_MESSAGES__", json.dumps(
    DENY_MESSAGES, sort_keys=True).replace("<", "\\u003c")).encode("utf-8")
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src %s; style-src %s; "
                               "connect-src 'self'; worker-src blob:; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'" % (
                                   _inline_hashes(DASHBOARD_HTML, "script"),
                                   _inline_hashes(DASHBOARD_HTML, "style")),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


###############################################################################
# 8. Command line
###############################################################################

CLI = Principal("cli", "command line", ALL_SCOPES, None)    # who the audit trail names


def build_parser():
    # Absent flags are left out (SUPPRESS), not set to None: `hall.py --db x token list`
    # must not have the command's own --db, absent, undo the one given before it.
    database = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    database.add_argument("--db", dest="db_path",
                          help="SQLite file (HALL_DB_PATH, default hall.db)")
    serving = argparse.ArgumentParser(add_help=False, parents=[database],
                                      argument_default=argparse.SUPPRESS)
    serving.add_argument("--host", help="bind address (HALL_API_HOST, default 127.0.0.1)")
    serving.add_argument("--port", help="TCP port (HALL_API_PORT, default 8765; 0 = any free)")
    serving.add_argument("--rules", dest="rules_path", help="operator rules JSON (HALL_RULES_PATH)")
    serving.add_argument("--policy", dest="policy_path",
                         help="operator policy JSON (HALL_POLICY_PATH)")
    serving.add_argument("--tls-cert", dest="tls_cert", help="certificate PEM (HALL_TLS_CERT)")
    serving.add_argument("--tls-key", dest="tls_key", help="private key PEM (HALL_TLS_KEY)")
    serving.add_argument("--allow-plain-http", dest="allow_plain_http", action="store_const",
                         const=True, help="serve plain HTTP on a non-loopback address (behind "
                                          "a TLS-terminating proxy; HALL_ALLOW_PLAIN_HTTP)")
    serving.add_argument("--log-json", dest="log_format", action="store_const", const="json",
                         help="access log as JSON lines (HALL_LOG_FORMAT=json)")
    parser = argparse.ArgumentParser(
        prog="hall.py", parents=[serving],      # `python hall.py --port 9000` serves too
        description="The local Hall: worker registry, router and decision log.  With no "
                    "command, serves the HTTP API.",
        epilog="Settings without a flag are environment variables: HALL_TOKEN, "
               "HALL_TOKEN_FILE, HALL_RECEIPT_KEYS, HALL_CORS_ORIGINS, HALL_MAX_BODY, "
               "HALL_ACCESS_LOG, HALL_APPROVAL_TTL, HALL_TENANTS, HALL_ATTEST_DIRS, "
               "HALL_REQUIRE_ATTESTATION, HALL_IDLE_TIMEOUT, HALL_REQUEST_TIMEOUT, "
               "HALL_MAX_CONNECTIONS, HALL_RATE_LIMIT, HALL_RATE_BURST, HALL_BUSY_TIMEOUT_MS, "
               "HALL_DRAIN_SECONDS, HALL_MAX_HEADER_LINE, HALL_MAX_HEADERS, "
               "HALL_EVENTS_RETAINED, HALL_RETENTION_DAYS (see the README).")
    commands = parser.add_subparsers(dest="command", metavar="[command]")
    commands.add_parser("serve", parents=[serving], help="serve the HTTP API (the default)")
    hash_cmd = commands.add_parser("hash", help="print the artifact_hash of a worker record")
    hash_cmd.add_argument("file", help="worker record JSON ('-' for standard input)")
    token = commands.add_parser("token", help="create, list or revoke API tokens")
    token_commands = token.add_subparsers(dest="token_command", metavar="{create,list,revoke}")
    token_commands.required = True
    create = token_commands.add_parser("create", parents=[database],
                                       help="create a token and print its secret (once)")
    create.add_argument("--name", required=True, help="what the token is for")
    create.add_argument("--scope", action="append", required=True, choices=SCOPES,
                        help="a scope (repeat for several)")
    create.add_argument("--tenant", help="limit the token to this tenant namespace")
    token_commands.add_parser("list", parents=[database],
                              help="list tokens (never their secrets)")
    revoke = token_commands.add_parser("revoke", parents=[database], help="revoke a token")
    revoke.add_argument("token_id")
    remote = argparse.ArgumentParser(add_help=False, parents=[database])
    remote.add_argument("--url", help="a running hall to ask instead of the database")
    remote.add_argument("--token", dest="url_token", help="token for --url (default: HALL_TOKEN)")
    route_cmd = commands.add_parser(
        "route", parents=[remote], help="ask for one routing decision (exit 0 allowed, "
                                        "1 denied, 2 error)")
    route_cmd.add_argument("--file", help="the request as JSON ('-' for standard input)")
    route_cmd.add_argument("--capability", dest="capability_id")
    route_cmd.add_argument("--env")
    route_cmd.add_argument("--data-label", dest="data_label")
    route_cmd.add_argument("--tenant", dest="tenant_id")
    route_cmd.add_argument("--tenant-risk", dest="tenant_risk")
    route_cmd.add_argument("--qos", dest="qos_class")
    route_cmd.add_argument("--correlation-id", dest="correlation_id")
    route_cmd.add_argument("--request", dest="request_json", help="the worker payload as JSON")
    route_cmd.add_argument("--blast-score", dest="blast_score", type=int)
    route_cmd.add_argument("--approval-id", dest="approval_id")
    route_cmd.add_argument("--dry-run", action="store_true", help="decide without logging")
    route_cmd.add_argument("--json", action="store_true", help="print the whole decision")
    route_cmd.add_argument("--explain", action="store_true",
                           help="print every pipeline step: what it saw and its outcome")
    enroll_cmd = commands.add_parser("enroll", parents=[remote], help="enroll a worker record")
    enroll_cmd.add_argument("file", help="worker record JSON ('-' for standard input)")
    enroll_cmd.add_argument("--compute-hash", action="store_true",
                            help="fill in the artifact_hash instead of checking it")
    check = commands.add_parser("rules", help="check a rules document")
    check.add_subparsers(dest="rules_command", metavar="{check}", required=True).add_parser(
        "check", help="validate it and report shadowed rules (exit 1 when unsafe for prod)"
    ).add_argument("file")
    policy_cmd = commands.add_parser("policy", help="check a policy document")
    policy_cmd.add_subparsers(dest="policy_command", metavar="{check}", required=True).add_parser(
        "check", help="validate it (exit 2 when invalid)").add_argument("file")
    commands.add_parser("status", parents=[remote], help="print /status")
    commands.add_parser("workers", parents=[remote], help="print the enrolled workers")
    listing = commands.add_parser("dispatches", parents=[remote], help="print recent decisions")
    export = commands.add_parser("export", parents=[database],
                                 help="stream decisions to standard output, oldest first")
    for p in (listing, export):
        p.add_argument("--since", help="ISO 8601: decided at or after")
        p.add_argument("--until", help="ISO 8601: decided before")
        p.add_argument("--tenant", dest="tenant_id")
        p.add_argument("--capability", dest="capability_id")
        p.add_argument("--env")
        p.add_argument("--denied", choices=("0", "1"))
    listing.add_argument("--limit", type=int, default=50)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    prune = commands.add_parser("prune", parents=[database],
                                help="remove decisions older than a number of days (audited)")
    prune.add_argument("--older-than", required=True, help="days, such as 90d or 90")
    commands.add_parser("verify-log", parents=[remote],
                        help="walk the decision log's hash chain (exit 0 intact, 1 not)")
    receipt = commands.add_parser("verify-receipt", parents=[remote],
                                  help="check a RouteDecision's receipt (exit 0 valid, 1 not)")
    receipt.add_argument("file", help="the decision as JSON ('-' for standard input)")
    keys = commands.add_parser("receipt-key", help="show or rotate the receipt keys")
    key_commands = keys.add_subparsers(dest="key_command", metavar="{show,rotate}")
    key_commands.required = True
    show = key_commands.add_parser("show", parents=[database],
                                   help="print the signing key's id and secret (hex) for workers")
    show.add_argument("--all", action="store_true", help="every key, not only the current one")
    key_commands.add_parser("rotate", parents=[database],
                            help="make a new signing key (old receipts still verify)")
    bench = commands.add_parser(
        "bench", help="measure this hall against the ceiling of its architecture",
        description="Start a hall on a temporary database filled with --decisions and "
                    "--workers (or measure the running hall at --url), drive each endpoint "
                    "with keep-alive load from separate processes, drive a constant-answer "
                    "server the same way in the same run, and print req/s, p50/p99 latency "
                    "and the ratio to that ceiling, plus the hall's peak RSS.")
    bench.add_argument("--url", help="a running hall to measure instead (http only; enroll and "
                                     "ingest write bench rows into it)")
    bench.add_argument("--token", dest="url_token",
                       help="a token with every scope for --url (or HALL_TOKEN)")
    bench.add_argument("--decisions", type=int, default=200000, help="decisions stored first")
    bench.add_argument("--workers", type=int, default=1000, help="workers enrolled first")
    bench.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    bench.add_argument("--processes", type=int, default=4, help="load processes")
    bench.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    return parser


def run_server(config):
    if (not config.token and config.db_path != ":memory:" and not os.path.exists(config.db_path)
            and os.path.exists(config.token_path)):
        raise ConfigError("token file %s exists but database %s does not: it belongs to another "
                          "hall or an earlier database; move it away (or set HALL_TOKEN_FILE) "
                          "and start again" % (config.token_path, config.db_path))
    tls = check_can_listen(config, config.host, config.port)
    hall = Hall(config)
    server = None
    try:
        server = make_server(hall, config.host, config.port, tls)
        token_file, secret = hall.ensure_admin_token()
    except BaseException:
        if server is not None:
            server.server_close()
        hall.close()
        raise
    def stop(signum, frame):
        threading.Thread(target=stopping, args=(signal.Signals(signum).name,),
                         daemon=True).start()

    def stopping(name):                         # (not in the handler: print is not reentrant)
        try:
            _say("[hall-api] %s: stopping; requests in flight have up to %ss to finish"
                 % (name, config.drain_seconds))
        finally:
            server.shutdown()

    signal.signal(signal.SIGINT, stop)          # before the start line: a supervisor may
    signal.signal(signal.SIGTERM, stop)         # signal as soon as it reads it
    _say("[hall-api] PyHall API v%s starting on %s" % (__version__, server.url))
    if token_file:
        _say("[hall-api] first start: admin token written to %s (mode 0600)" % token_file)
    elif secret:
        _say("[hall-api] in-memory hall: its admin token (kept nowhere) is %s" % secret)
    if hall.operator_rules is not None:
        for earlier, later in hall.operator_rules.shadowed:
            print("[hall-api] warning: rule %r is shadowed by earlier rule %r (routes in prod "
                  "and edge are denied until fixed)" % (later, earlier), file=sys.stderr)

    hall.start_retention()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        hall.stopping = True                # ends event streams and the retention loop
        server.server_close()               # no new connections
        cut_off = server.drain()
        if cut_off:
            print("[hall-api] warning: %d request(s) not answered within %ss were cut off"
                  % (cut_off, config.drain_seconds), file=sys.stderr)
        hall.close(server.stop_by)          # checkpoints the WAL into the database
    _say("[hall-api] stopped")
    return 0


def _say(line):
    """A line for the operator on stdout.  A stdout gone (``python hall.py |
    head -1``) stops nothing."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        _stdout_gone()


def _stdout_gone():
    """Point stdout at /dev/null, so that what is left in its buffer (flushed
    at exit) does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def read_json_argument(path):
    """A JSON document from a file path, or standard input for '-'."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as handle:
                raw = handle.read()
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc))
    try:
        return parse_json_body(raw, "the file")
    except HallError as exc:
        raise ConfigError("%s: %s" % (path, exc.message))


def cmd_hash(args):
    record = read_json_argument(args.file)
    if not isinstance(record, dict):
        raise ConfigError("%s: a worker record is a JSON object" % args.file)
    print(compute_artifact_hash(record))
    return 0


def existing_hall(args):
    """A Hall over the configured database, which must already exist."""
    config = Config.load(args)
    if config.db_path != ":memory:" and not os.path.exists(config.db_path):
        raise ConfigError("no database at %s (use --db, or --url for a running hall)"
                          % config.db_path)
    return Hall(config)


@contextlib.contextmanager
def hall_made_if_new(args):
    """A Hall over the configured database, made if there is none yet.  A
    command that fails on a database it made removes it (and the key file
    made with it): a refused request leaves nothing behind."""
    config = Config.load(args)
    made = [] if config.db_path == ":memory:" or os.path.lexists(config.db_path) else [
        config.db_path + suffix for suffix in ("", "-wal", "-shm", "-journal")] + [
        path for path in (config.receipt_keys_path,) if not os.path.lexists(path)]
    hall = Hall(config)
    try:
        yield hall
    except BaseException:
        hall.close()
        for path in made:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise
    hall.close()


def call_hall(args, method, path, body=None, shape=True):
    """An HTTP call to the hall at --url; returns (status, parsed JSON): an
    object, which must fit the schema the route publishes for that status
    when ``shape`` (the caller reads its fields, not only prints them)."""
    import http.client
    import urllib.error
    import urllib.request
    token = args.url_token or os.environ.get("HALL_TOKEN")
    try:
        if urlsplit(args.url).scheme not in ("http", "https"):    # (urllib also reads files)
            raise ConfigError("--url must be an http:// or https:// URL of a running hall")
        request = urllib.request.Request(
            args.url.rstrip("/") + path, method=method,
            data=json.dumps(body).encode() if body is not None else None)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", "Bearer " + token)
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        answer = None
        with contextlib.suppress(OSError, HallError, http.client.HTTPException):
            answer = parse_json_body(exc.read() or b"{}", "answer")
        if not (isinstance(answer, dict) and answer.get("error")):
            raise ConfigError("%s %s: %d (not an answer of a hall)" % (method, path, exc.code))
        raise ConfigError("%s %s: %d %s" % (method, path, exc.code, answer["error"]))
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        raise ConfigError("cannot reach %s: %s" % (args.url, getattr(exc, "reason", exc)))
    try:
        answer = parse_json_body(text or b"null", "answer")
        declared = (find_route(path.partition("?")[0])[0] or {}).get(method)
        schema = declared.responses.get(status) if declared and shape else ANY_OBJECT
        problem = ("status %d" % status if schema is None else
                   schema_problem(answer, dict(schema, nullable=False)))
    except HallError as exc:                    # (not JSON)
        problem = exc.message
    if problem:
        raise ConfigError("%s answered %s %s with something other than a hall's answer "
                          "(%s): is it a hall?" % (args.url, method, path, problem))
    return status, answer


def ask_hall(args, method, path, local, body=None):
    """The answer of the running hall at --url (which must fit the route's
    schema), else ``local(hall)`` over the database."""
    if args.url:
        return call_hall(args, method, path, body)[1]
    hall = existing_hall(args)
    try:
        return local(hall)
    finally:
        hall.close()


def print_json(value):
    print(json.dumps(_finite_floats(value), indent=2, default=_blob_text))


def cmd_route(args):
    body = read_json_argument(args.file) if args.file else {}
    if not isinstance(body, dict):
        raise ConfigError("the request must be a JSON object")
    for name in ("capability_id", "env", "data_label", "tenant_id", "tenant_risk", "qos_class",
                 "correlation_id", "blast_score", "approval_id"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.request_json:
        try:                                    # (as strictly as the HTTP API reads it)
            body["request"] = parse_json_body(args.request_json.encode("utf-8", "replace"),
                                              "--request")
        except HallError as exc:
            raise ConfigError(exc.message)
    if args.dry_run:
        body["dry_run"] = True
    if args.explain:
        body["explain"] = True
    decision = ask_hall(args, "POST", "/api/route", lambda hall: hall.route(body, CLI), body)
    if args.json:
        print_json(decision)
        return 0 if decision["allowed"] else 1
    if args.explain:
        print_trace(decision.get("trace") or [])
    if decision["allowed"]:
        print("allowed: %s (%s, rule %s)" % (decision["worker_id"],
                                             decision["selected_worker_species_id"],
                                             decision["matched_rule_id"]))
    else:
        reason = decision["deny_reason_if_denied"]
        reason = reason if isinstance(reason, dict) else {}
        print("denied: %s: %s%s" % (reason.get("code"), reason.get("message"),
                                    " (approval %s)" % reason["approval_id"]
                                    if reason.get("approval_id") else ""))
    return 0 if decision["allowed"] else 1


def print_trace(trace):
    """An explained decision's steps, one block each."""
    for step in trace:
        print("%d. %-19s %s%s" % (step["step"], step["name"], step["outcome"].upper(),
                                  "  " + step["deny_code"] if step.get("deny_code") else ""))
        for key, value in step.items():
            if key not in ("step", "name", "outcome", "deny_code"):
                shown = value if isinstance(value, str) else json.dumps(value)
                print("     %s: %s" % (key, shown if len(shown) < 400 else shown[:400] + "..."))


def verify_log_file(config):
    """walk_chain over the database file, opened read-only: nothing is
    migrated, created or written, so a copy, a read-only file or one from
    another hall can be checked.  The head's signature is checked when the
    key file is there (report["head_signed"] is None when it is not)."""
    path = config.db_path
    if path == ":memory:" or not os.path.isfile(path):
        raise ConfigError("no database at %s (use --db, or --url for a running hall)" % path)
    keys = None
    if os.path.exists(config.receipt_keys_path):
        keys = Keyring(config.receipt_keys_path, may_create=False).secrets()
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % quote(os.path.abspath(path)),
                               uri=True, timeout=config.busy_timeout / 1000.0)
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'chain'").fetchone():
                raise ConfigError("%s has no evidence chain yet: a hall adds it (sealing the "
                                  "rows there) when it first opens the file" % path)
            conn.execute("BEGIN")               # one snapshot, even while a hall writes
            return walk_chain(conn, keys)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError("cannot read database %s: %s" % (path, exc))


def cmd_verify_log(args):
    if args.url:
        report = ask_hall(args, "GET", "/api/log/verify", None)
    else:
        config = Config.load(args)
        report = verify_log_file(config)
        if report["head_signed"] is None:
            print("the head's signature is not checked: no key file at %s"
                  % config.receipt_keys_path)
    sealed = report["sealed"]
    if report["intact"]:
        print("intact: %d entries, chain length %d, head %s" % (
            report["entries"], report["length"], report["head"]))
    else:
        print("NOT intact: %d problem(s), in chain order:" % len(report["problems"]))
        for problem in report["problems"]:
            print("  %s: %s" % (problem["problem"], problem["message"]))
    if report["pruned"]:
        print("%d entries were pruned (vouched for by the prune's audit entries)"
              % report["pruned"])
    if sealed:
        print("%d entries predate the chain: sealed at migration, %s" % (
            sealed["entries"], sealed["at"] or "at a time not recorded"))
    return 0 if report["intact"] else 1


def cmd_verify_receipt(args):
    decision = read_json_argument(args.file)
    answer = ask_hall(args, "POST", "/api/receipts/verify",
                      lambda hall: hall.verify_receipt(decision), decision)
    print("%s: %s%s" % ("valid" if answer["valid"] else "INVALID", answer["reason"],
                        "; in the decision log" if answer["in_log"] else
                        ("; not in the decision log (a dry run, or pruned)"
                         if answer["valid"] else "")))
    return 0 if answer["valid"] else 1


def cmd_receipt_key(args):
    hall = existing_hall(args)
    try:
        if args.key_command == "rotate":
            hall.rotate_receipt_key(CLI)
            print("signing key is now %s" % hall.keyring.current)
            return 0
        keyring = hall.keyring
        for key_id, secret in keyring.secrets().items():     # re-reads the file first
            if args.all or key_id == keyring.current:
                print("%s %s%s" % (key_id, secret.hex(),
                                   " (current)" if key_id == keyring.current else ""))
        return 0
    finally:
        hall.close()


def cmd_enroll(args):
    record = read_json_argument(args.file)
    if not isinstance(record, dict):
        raise ConfigError("%s: a worker record is a JSON object" % args.file)
    if args.compute_hash:
        record["artifact_hash"] = compute_artifact_hash(record)
    if args.url:
        print_json(call_hall(args, "POST", "/enroll", record, shape=False)[1])
        return 0
    with hall_made_if_new(args) as hall:
        print_json(hall.enroll(record, CLI))
    return 0


def cmd_rules_check(args):
    try:
        rules = compile_rules(read_json_argument(args.file), source="file")
    except RulesError as exc:
        raise ConfigError("%s: %s" % (args.file, exc))
    print("%s: %d rules" % (args.file, len(rules.rules)))
    for earlier, later in rules.shadowed:
        print("shadowed: rule %r can never match: rule %r before it matches everything it does"
              % (later, earlier))
    if rules.shadowed:
        print("unsafe for prod and edge: routes there are denied DENY_SHADOW_RULES_DETECTED")
        return 1
    print("ok")
    return 0


def cmd_policy_check(args):
    try:
        policy = compile_policy(read_json_argument(args.file))
    except RulesError as exc:
        raise ConfigError("%s: %s" % (args.file, exc))
    print("%s: policy %s, default %s, %d rules; ok" % (args.file, policy.version,
                                                        policy.default, len(policy.rules)))
    return 0


def decision_filters(args):
    filters = {name: getattr(args, name) for name in ("tenant_id", "capability_id", "env")
               if getattr(args, name)}
    if args.denied is not None:
        filters["denied"] = int(args.denied)
    for bound in ("since", "until"):
        if getattr(args, bound):
            filters[bound] = parse_timestamp(getattr(args, bound))
            if filters[bound] is None:
                raise ConfigError("--%s must be an ISO 8601 time" % bound)
    return filters


def cmd_read(args):
    """status, workers, dispatches: from --url or the database."""
    if args.command == "dispatches":
        if not 1 <= args.limit <= 200:
            raise ConfigError("--limit must be from 1 to 200")
        filters = decision_filters(args)
        if args.url:
            from urllib.parse import urlencode
            query = dict(filters, limit=args.limit)
            path = "/dispatches?" + urlencode(query) + "&cursor="    # (paged, as from the file)
            print_json(call_hall(args, "GET", path, shape=False)[1])
            return 0
    elif args.url:
        print_json(call_hall(args, "GET", "/" + args.command, shape=False)[1])
        return 0
    hall = existing_hall(args)
    try:
        if args.command == "status":
            print_json(hall.status())
        elif args.command == "workers":
            print_json(hall.workers())
        else:
            print_json(hall.decision_page(decision_filters(args), None, args.limit))
    finally:
        hall.close()
    return 0


def cmd_export(args):
    import csv
    hall = existing_hall(args)
    try:
        rows = hall.export_decisions(decision_filters(args))
        if args.format == "csv":
            writer = csv.DictWriter(sys.stdout, fieldnames=DECISION_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
        else:
            for row in rows:
                sys.stdout.write(_JSON(row) + "\n")
    finally:
        hall.close()
    return 0


def cmd_prune(args):
    match = re.match(r"^([0-9]+)d?$", args.older_than.strip())
    if not match:
        raise ConfigError("--older-than takes a number of days, such as 90d")
    hall = existing_hall(args)
    try:
        result = hall.prune(int(match.group(1)), CLI)
    finally:
        hall.close()
    print("removed %d decisions decided before %s" % (result["removed"], result["before"]))
    if result["kept"]:
        print("kept %d that fail their chain check: run verify-log" % result["kept"])
    return 1 if result["kept"] else 0


def cmd_token(args):
    if args.token_command == "create":          # a first token may make the database
        with hall_made_if_new(args) as hall:
            token_id, secret = hall.create_token(args.name, sorted(set(args.scope)),
                                                 args.tenant, CLI)
            print("created %s (%s; scopes %s%s); its secret follows, shown only now"
                  % (token_id, clean_id(args.name), " ".join(sorted(set(args.scope))),
                     "; tenant " + clean_id(args.tenant) if args.tenant else ""),
                  file=sys.stderr)
            print(secret)
        return 0
    hall = existing_hall(args)                  # listing or revoking: it must exist
    try:
        if args.token_command == "list":
            columns = ("token_id", "name", "scopes", "tenant", "created_at", "last_used_at",
                       "revoked_at")
            rows = [[" ".join(t["scopes"]) if c == "scopes" else (t[c] or "-")
                     for c in columns] for t in hall.tokens()["tokens"]]
            print_table(columns, rows)
        else:
            hall.revoke_token(args.token_id, CLI)
            print("revoked %s" % args.token_id)
    finally:
        hall.close()
    return 0


def print_table(columns, rows):
    """Aligned columns; a control character in a value (a name, say) is left
    out rather than sent to the terminal."""
    rows = [[clean_id(str(value)) for value in row] for row in [list(columns)] + rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())


# -- bench: the hall against the ceiling of its architecture, side by side ------
#
# The ceiling is a bare ThreadingHTTPServer that answers a constant body in one
# write: what any hall built on http.server could at best do on this machine.
# Both are driven by the same load (keep-alive connections spread over separate
# processes) in one run, so the ratios hold on noisy or shared machines.

BENCH_TARGETS = [
    # (label, method, path, ratio of the ceiling it should reach)
    ("GET /health", "GET", "/health", 0.7),
    ("GET /status", "GET", "/status", 0.7),
    ("GET /dispatches?limit=50", "GET", "/dispatches?limit=50", 0.4),
    ("GET /workers", "GET", "/workers", 0.4),
    ("POST /api/route", "POST", "/api/route", 0.4),
    ("POST /decisions/ingest", "POST", "/decisions/ingest", 0.5),
    ("POST /enroll", "POST", "/enroll", 0.3),
]


class _CeilingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
              b"Content-Length: 16\r\n\r\n{\"status\": \"ok\"}")

    def do_GET(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.wfile.write(self.answer)

    do_POST = do_GET

    def log_message(self, format, *args):
        pass


class _CeilingServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = HallHTTPServer.request_queue_size  # (the default, 5, drops SYNs
    # when a run opens its connections at once: they then wait a second to retry)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # (a load process gone mid-request)
            ThreadingHTTPServer.handle_error(self, request, client_address)


def _default_sigterm():
    """In the bench's child processes: a stop ends them plainly."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _bench_stopped(signum, frame):
    raise KeyboardInterrupt()                   # unwinds through the bench's cleanup


def _serve_ceiling(port_queue):
    _default_sigterm()
    server = _CeilingServer(("127.0.0.1", 0), _CeilingHandler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


def _bench_requests(method, path, token, records):
    """The raw requests a load process cycles through for one endpoint."""
    def raw(body):
        data = json.dumps(body).encode() if body is not None else b""
        head = "%s %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n" % (
            method, path, token)
        if body is not None:
            head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
        return head.encode() + b"\r\n" + data
    if path == "/api/route":
        return [raw({"capability_id": "cap.bench.0", "env": "dev", "data_label": "PUBLIC",
                     "tenant_id": "bench"})]
    if path == "/decisions/ingest":         # no decision_id: every one is a new row
        return [raw({"capability_id": "cap.bench.0", "tenant_id": "bench", "env": "dev",
                     "denied": False, "selected_worker": "wrk.bench.0", "blast_score": 10})]
    if path == "/enroll":                   # re-enrolling existing workers
        return [raw(record) for record in records[:200]]
    return [raw(None)]


def _bench_load(job):
    """One load process: ``connections`` keep-alive connections, each sending
    its next request as soon as the answer to the last one is complete.
    Returns (latencies of answers completed after warm-up, errors: the
    requests, warm-up included, not answered below 400).  A connection
    refused, reset, closed, answering what is not HTTP or not done 10 s
    past the end is an error and ends; one the server closes (Connection:
    close) just ends.  Nothing is raised."""
    host, port, requests, connections, warmup, seconds = job
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    measure_from, deadline = started + warmup, started + warmup + seconds
    latencies, errors, turn = [], 0, 0

    class Connection(object):
        def __init__(self):
            self.sock = socket.create_connection((host, port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = bytearray()
            self.needed = None              # bytes of the answer, once its head is read
            self.last = False               # the server closes after this answer

        def send(self):
            nonlocal turn
            self.start = time.monotonic()
            self.sock.sendall(requests[turn % len(requests)])
            turn += 1

        def answered(self):
            """The status of the answer now complete in the buffer, or None."""
            if self.needed is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > 1 << 16:
                        raise ValueError("an answer head without an end")
                    return None
                head = bytes(self.buffer[:end])
                match = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
                if not match:
                    raise ValueError("an answer without Content-Length")
                self.needed = end + 4 + int(match.group(1))
                if self.needed > 1 << 26:   # (no answer of the bench is near this)
                    raise ValueError("an answer too long to be one")
                self.last = re.search(rb"(?i)\r\nconnection: *close", head) is not None
            if len(self.buffer) < self.needed:
                return None
            status = int(self.buffer[9:12])
            del self.buffer[:self.needed]
            self.needed = None
            return status

    def end(connection):
        with contextlib.suppress(KeyError):
            selector.unregister(connection.sock)
        connection.sock.close()

    for _ in range(connections):
        connection = None
        try:
            connection = Connection()
            selector.register(connection.sock, selectors.EVENT_READ, connection)
            connection.send()
        except OSError:
            errors += 1
            if connection is not None:
                end(connection)
    while selector.get_map():
        events = selector.select(timeout=1)
        if time.monotonic() > deadline + 10:    # the hall stopped answering (or trickles)
            for key in list(selector.get_map().values()):
                errors += 1
                end(key.data)
            break
        for key, _events in events:
            connection = key.data
            try:
                chunk = connection.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("closed")
                connection.buffer += chunk
                status = connection.answered()
                if status is None:
                    continue
                moment = time.monotonic()
                errors += status >= 400
                if moment >= measure_from:
                    latencies.append(moment - connection.start)
                if moment >= deadline or connection.last:
                    end(connection)
                else:
                    connection.send()
            except (OSError, ValueError):
                errors += 1
                end(connection)
    return latencies, errors


def _run_load(pool, host, port, requests, connections, processes, warmup, seconds):
    share = [connections // processes + (i < connections % processes) for i in range(processes)]
    results = pool.map(_bench_load, [(host, port, requests, n, warmup, seconds)
                                     for n in share if n])
    latencies = sorted(l for part, _ in results for l in part)
    errors = sum(e for _, e in results)
    if not latencies:
        return 0.0, 0.0, 0.0, errors

    def percentile(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return len(latencies) / seconds, percentile(0.50), percentile(0.99), errors


def _preload(db_path, decisions, workers):
    """Fill a new database directly: ``workers`` enrollments over 50
    capabilities and ``decisions`` decisions over the last 30 days."""
    hall = Hall(Config(db_path=db_path, access_log=False))   # the head is signed, as always
    store = hall.store
    records, now = [], time.time()
    for i in range(workers):
        record = {"worker_id": "bench.worker.%d" % i, "worker_species_id": "wrk.bench.%d" % i,
                  "capabilities": ["cap.bench.%d" % (i % 50)], "risk_tier": "low",
                  "currently_implements": ["ctrl.obs.audit-log-append-only"]}
        record["artifact_hash"] = compute_artifact_hash(record)
        records.append(record)
    stamp = lambda seconds_ago: datetime.datetime.fromtimestamp(
        now - seconds_ago, datetime.timezone.utc).isoformat(timespec="microseconds")
    def work(conn):
        conn.executemany(
            "INSERT INTO enrollments (enrollment_id, worker_id, worker_species_id, capabilities,"
            " risk_tier, enrolled_at, artifact_hash, record_json) VALUES (?,?,?,?,?,?,?,?)",
            [(new_id(), r["worker_id"], r["worker_species_id"],
              json.dumps(r["capabilities"]), "low", stamp(workers - i), r["artifact_hash"],
              json.dumps(r)) for i, r in enumerate(records)])
        for i in range(decisions):              # chained, as the hall writes them
            store._append(conn, "decisions", [
                new_id(), stamp(30 * 86400.0 * (decisions - i) / decisions),
                "cap.bench.%d" % (i % 50), "tenant.%d" % (i % 20), "dev", int(i % 10 == 0),
                "DENY_NO_MATCHING_RULE" if i % 10 == 0 else None,
                None if i % 10 == 0 else "wrk.bench.%d" % (i % 50), i % 100,
                "sha256:" + "0" * 64, "ingest", None, None, None])
    store.write(work)
    hall.close()
    return records


def _peak_rss_mb(pid):
    """Peak resident memory of a process (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cmd_bench(args):
    import multiprocessing                      # only the benchmark needs it
    for name, low in (("decisions", 0), ("workers", 1), ("processes", 1),
                      ("connections", args.processes)):
        if getattr(args, name) < low:
            raise ConfigError("--%s must be at least %d" % (name, low))
    if not (0 < args.seconds <= 3600 and 0 <= args.warmup <= 3600):
        raise ConfigError("--seconds must be above 0 and --warmup at least 0 (at most 3600)")
    token = args.url_token or os.environ.get("HALL_TOKEN") or "bench-" + secrets.token_hex(16)
    tmp, hall_process, records = None, None, []
    # A stop (SIGTERM) unwinds like Ctrl-C, through the cleanup below: no
    # hall, ceiling server or temporary database is left behind.
    signal.signal(signal.SIGTERM, _bench_stopped)
    port_queue = multiprocessing.Queue()
    ceiling = multiprocessing.Process(target=_serve_ceiling, args=(port_queue,), daemon=True)
    try:
        if args.url:
            try:
                split = urlsplit(args.url)
                host, port = split.hostname, split.port or 80
            except ValueError:                  # (a bad port, an unclosed [)
                split = host = None
            if not host or split.scheme != "http":
                raise ConfigError("--url must be an http:// URL of a running hall")
            call_hall(args, "GET", "/health")   # a hall is there (else: one line, exit 2)
            print("bench: against %s (its own data)" % args.url)
        else:
            tmp = tempfile.mkdtemp(prefix="hall-bench-")
            db = os.path.join(tmp, "hall.db")
            print("bench: preloading %d decisions and %d workers ..." % (args.decisions,
                                                                         args.workers), flush=True)
            records = _preload(db, args.decisions, args.workers)
            environ = dict(os.environ, HALL_TOKEN=token, HALL_ACCESS_LOG="off",
                           HALL_API_PORT="0", HALL_API_HOST="127.0.0.1", HALL_DB_PATH=db,
                           HALL_TOKEN_FILE=os.path.join(tmp, "hall.token"))
            for name in ("HALL_RULES_PATH", "HALL_POLICY_PATH", "HALL_TLS_CERT", "HALL_TLS_KEY",
                         "HALL_RATE_LIMIT"):
                environ.pop(name, None)
            hall_process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve"],
                                            env=environ, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, universal_newlines=True)
            line = hall_process.stdout.readline()
            if " on http://" not in line:
                raise ConfigError("the hall did not start: %s" % line.strip())
            host, port = "127.0.0.1", int(line.rsplit(":", 1)[1])
        if not records:
            records = [dict(r, artifact_hash=compute_artifact_hash(r)) for r in (
                {"worker_id": "bench.worker.%d" % i, "worker_species_id": "wrk.bench.%d" % i,
                 "capabilities": ["cap.bench.0"], "risk_tier": "low"} for i in range(200))]
        ceiling.start()
        ceiling_port = port_queue.get(timeout=10)
        print("bench: %d connections from %d processes, %.0f s per run after %.1f s warm-up"
              % (args.connections, args.processes, args.seconds, args.warmup), flush=True)
        columns = ("endpoint", "req/s", "p50 ms", "p99 ms", "errors", "ceiling req/s", "ratio",
                   "target")
        rows, failed = [], False
        with multiprocessing.Pool(args.processes, initializer=_default_sigterm) as pool:
            for label, method, path, target in BENCH_TARGETS:
                requests = _bench_requests(method, path, token, records)
                rate, p50, p99, errors = _run_load(pool, host, port, requests, args.connections,
                                                   args.processes, args.warmup, args.seconds)
                ceiling_rate = _run_load(pool, "127.0.0.1", ceiling_port, requests,
                                         args.connections, args.processes, args.warmup,
                                         args.seconds)[0]
                ratio = rate / ceiling_rate if ceiling_rate else 0.0
                failed = failed or errors > 0
                rows.append([label, "%.0f" % rate, "%.1f" % p50, "%.1f" % p99, str(errors),
                             "%.0f" % ceiling_rate, "%.2f" % ratio,
                             "%.1f %s" % (target, "ERRORS" if errors else
                                          "ok" if ratio >= target else "MISSED")])
                print("  %-28s %8.0f req/s  p99 %6.1f ms  ratio %.2f" % (label, rate, p99, ratio),
                      flush=True)
        print()
        print_table(columns, rows)
        if hall_process is not None:
            rss = _peak_rss_mb(hall_process.pid)
            print("\npeak RSS of the hall: %s" % ("%.1f MB" % rss if rss else "unknown"))
    finally:
        if ceiling.is_alive():
            ceiling.terminate()
        if hall_process is not None:
            hall_process.terminate()
            hall_process.wait(30)
            hall_process.stdout.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        print("some requests failed (the errors column): the figures do not measure the hall",
              file=sys.stderr)
    return 1 if failed else 0


COMMANDS = {"hash": cmd_hash, "token": cmd_token, "bench": cmd_bench, "route": cmd_route,
            "enroll": cmd_enroll, "status": cmd_read, "workers": cmd_read,
            "dispatches": cmd_read, "export": cmd_export, "prune": cmd_prune,
            "verify-log": cmd_verify_log, "verify-receipt": cmd_verify_receipt,
            "receipt-key": cmd_receipt_key, "rules": cmd_rules_check,
            "policy": cmd_policy_check}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        command = COMMANDS.get(args.command)
        code = command(args) if command else run_server(Config.load(args))
        sys.stdout.flush()                      # (a full disk is told here, as an error)
        return code
    except (ConfigError, HallError) as exc:
        print("hall.py: error: %s" % (exc.message if isinstance(exc, HallError) else exc),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:                      # the output cannot be written: an error,
        _stdout_gone()                          # never "denied" (route's 1), nor a traceback
        if not isinstance(exc, BrokenPipeError):    # (`export | head`: the reader is done)
            print("hall.py: error: %s" % exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
