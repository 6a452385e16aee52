#!/usr/bin/env python3
"""Seed and check the servers that bench/documents.sh measures (stdlib only).

Every subcommand talks to one server on loopback, prepares the `posts` collection (or
`todos` for the owner-rule query), seeds it, checks that the benchmarked requests answer
what they should, and writes the files the wrk scripts read (ids, headers) into OUT.

  docs_seed.py pocketbase URL OUT N            (superuser admin@example.com / PB_PASSWORD)
  docs_seed.py parse      URL OUT N            (appId bench, masterKey benchmasterkey)
  docs_seed.py basalt     URL OUT N KEY        (KEY: a service key, bsk_...)
  docs_seed.py basalt-owner URL OUT TOTAL KEY  (grow `todos` to TOTAL docs; idempotent)

Seeded data, the same on every server: N records {title: "post i", n: i, tag: "abc"[i % 3]},
an index on n. The benchmarked query (n >= 100 and n < 200 and tag == "a", 20 per page, with
the total) matches 34 records when N >= 200.
"""
import http.client
import json
import os
import random
import string
import sys
import urllib.parse

QUERY_LO, QUERY_HI, QUERY_TAG, PAGE = 100, 200, "a", 20


def expected_total(n):
    return sum(1 for i in range(n) if QUERY_LO <= i < QUERY_HI and i % 3 == 0)


class Client:
    def __init__(self, base, headers=None):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port
        assert self.host in ("127.0.0.1", "localhost", "::1"), "loopback only"
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        self.headers = dict(headers or {})

    def call(self, method, path, body=None, headers=None, ok=(200, 201, 204)):
        h = {"Content-Type": "application/json", **self.headers, **(headers or {})}
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=h)
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
                if attempt:
                    raise
        text = raw.decode("utf-8", "replace")
        if resp.status not in ok:
            sys.exit(f"{method} {path} -> {resp.status} {text[:600]}")
        return json.loads(text) if text.strip() else None


def post(i):
    return {"title": f"post {i}", "n": i, "tag": "abc"[i % 3]}


def write(out, name, text):
    with open(os.path.join(out, name), "w") as f:
        f.write(text)


def write_ids(out, ids):
    write(out, "ids.txt", "\n".join(ids) + "\n")


def write_headers(out, headers):
    # one "Name: value" per line; the wrk scripts add them to every request
    write(out, "headers.txt", "".join(f"{k}: {v}\n" for k, v in headers.items()))


def check_page(label, items, total, n):
    want = expected_total(n)
    got_n = sorted(d["n"] for d in items)
    if total != want or len(items) != min(PAGE, want) or any(
        not (QUERY_LO <= x < QUERY_HI) for x in got_n
    ):
        sys.exit(f"{label}: query answered {len(items)} items, total {total}; want "
                 f"{min(PAGE, want)} items in [{QUERY_LO},{QUERY_HI}), total {want}")


def pocketbase(url, out, n):
    c = Client(url)
    pw = os.environ.get("PB_PASSWORD", "Passw0rd!Passw0rd")
    tok = c.call("POST", "/api/collections/_superusers/auth-with-password",
                 {"identity": "admin@example.com", "password": pw})["token"]
    admin = {"Authorization": tok}
    # request logging doubles PocketBase's cost; the comparison runs with it off
    s = c.call("PATCH", "/api/settings", {"logs": {"maxDays": 0}}, admin)
    assert s["logs"]["maxDays"] == 0, s["logs"]
    c.call("POST", "/api/collections", {
        "name": "posts", "type": "base",
        "listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": "",
        "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"},
                   {"name": "tag", "type": "text"}],
        "indexes": ["CREATE INDEX idx_posts_n ON posts (n)"],
    }, admin)
    ids = [c.call("POST", "/api/collections/posts/records", post(i))["id"] for i in range(n)]
    write_ids(out, ids)
    write_headers(out, {})
    # the same requests wrk sends, as an anonymous client (public rules)
    one = c.call("GET", f"/api/collections/posts/records/{ids[7]}")
    assert one["n"] == 7, one
    page = c.call("GET", "/api/collections/posts/records?" + pb_query())
    check_page("pocketbase", page["items"], page["totalItems"], n)
    print(f"pocketbase: {n} records seeded")


def pb_query():
    return urllib.parse.urlencode({
        "filter": f"n >= {QUERY_LO} && n < {QUERY_HI} && tag = '{QUERY_TAG}'",
        "perPage": PAGE})


def parse(url, out, n):
    app = {"X-Parse-Application-Id": "bench"}
    c = Client(url, app)
    master = {"X-Parse-Master-Key": "benchmasterkey"}
    c.call("POST", "/parse/schemas/posts", {
        "className": "posts",
        "fields": {"title": {"type": "String"}, "n": {"type": "Number"},
                   "tag": {"type": "String"}},
        "indexes": {"n_1": {"n": 1}},
    }, master)
    # one create per record (POST /parse/batch answers 500 in parse-server 9.10: its batch
    # router calls Object.keys on undefined route params)
    ids = [c.call("POST", "/parse/classes/posts", post(i), ok=(201,))["objectId"]
           for i in range(n)]
    write_ids(out, ids)
    write_headers(out, app)
    one = c.call("GET", f"/parse/classes/posts/{ids[7]}")
    assert one["n"] == 7, one
    page = c.call("GET", "/parse/classes/posts?" + parse_query())
    check_page("parse", page["results"], page["count"], n)
    print(f"parse: {n} objects seeded")


def parse_query():
    return urllib.parse.urlencode({
        "where": json.dumps({"n": {"$gte": QUERY_LO, "$lt": QUERY_HI}, "tag": QUERY_TAG},
                            separators=(",", ":")),
        "limit": PAGE, "count": 1})


BASALT_QUERY = {"where": [["n", ">=", QUERY_LO], ["n", "<", QUERY_HI],
                          ["tag", "==", QUERY_TAG]], "limit": PAGE, "count": True}


def basalt(url, out, n, key):
    svc = Client(url, {"Authorization": f"Bearer {key}"})
    svc.call("PUT", "/v1/admin/collections/posts", {
        "rules": {"read": "true", "create": "true", "update": "true", "delete": "true"},
        "indexes": [{"fields": [["n", "asc"]]}],
    })
    # seeded through the create endpoint, like the peers, as an anonymous client
    c = Client(url)
    ids = []
    for i in range(n):
        d = c.call("POST", "/v1/db/posts", {"data": post(i)}, ok=(201,))
        assert d["version"] == 1 and d["data"] == post(i), d
        ids.append(d["id"])
    write_ids(out, ids)
    write_headers(out, {})
    one = c.call("GET", f"/v1/db/posts/{ids[7]}")
    assert one["data"]["n"] == 7, one
    page = c.call("POST", "/v1/db/posts/_query", BASALT_QUERY)
    check_page("basalt", [d["data"] for d in page["documents"]], page.get("count"), n)
    print(f"basalt: {n} documents seeded")


def rand_id(rng, k=20):
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(k))


def basalt_owner(url, out, total, key):
    """Grow `todos` to TOTAL documents: ~100 owned by the bench user, the rest by 1000 others."""
    svc = Client(url, {"Authorization": f"Bearer {key}"})
    state_path = os.path.join(out, "owner_state.json")
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    else:
        svc.call("PUT", "/v1/admin/collections/todos", {
            "rules": {"read": "auth != null && resource.data.owner == auth.uid",
                      "create": "auth != null && request.data.owner == auth.uid",
                      "update": "auth != null && resource.data.owner == auth.uid",
                      "delete": "auth != null && resource.data.owner == auth.uid"},
            "indexes": [{"fields": [["owner", "asc"]]}],
        })
        s = Client(url).call("POST", "/v1/auth/signup",
                             {"email": "owner@example.com", "password": "owner password 1"})
        state = {"uid": s["user"]["id"], "count": 0, "mine": 0}
    rng = random.Random(state["count"])
    others = [f"user{j:04d}" for j in range(1000)]
    while state["count"] < total:
        writes = []
        for _ in range(min(500, total - state["count"])):
            i = state["count"]
            # the bench user owns every 100th of the first 10,000 documents (100 in all);
            # everything after belongs to 1000 other users, so the user's page stays the same
            mine = state["mine"] < 100 and i % 100 == 0
            owner = state["uid"] if mine else rng.choice(others)
            state["mine"] += 1 if mine else 0
            # random ids, like generated ones: the user's documents are spread through the
            # id order, so a plan that walks the primary key and filters owners row by row
            # reads ~10x more rows at 100k than at 10k (sequential ids would hide that)
            writes.append({"op": "create", "collection": "todos", "id": rand_id(rng),
                           "data": {"title": f"todo {i}", "done": i % 2 == 0, "owner": owner}})
            state["count"] += 1
        svc.call("POST", "/v1/db/_batch", {"writes": writes})
    with open(state_path, "w") as f:
        json.dump(state, f)
    # a fresh access token (they live 15 minutes)
    s = Client(url).call("POST", "/v1/auth/token?grant_type=password",
                         {"email": "owner@example.com", "password": "owner password 1"})
    state["token"] = s["session"]["access_token"]
    # check what the user sees: only own documents, all ~100 of them through the cursor
    user = Client(url, {"Authorization": f"Bearer {state['token']}"})
    seen, cursor = 0, None
    while True:
        body = {"limit": 20}
        if cursor:
            body["start_after"] = cursor
        page = user.call("POST", "/v1/db/todos/_query", body)
        for d in page["documents"]:
            if d["data"]["owner"] != state["uid"]:
                sys.exit(f"owner rule leaked {d['id']} owned by {d['data']['owner']}")
        seen += len(page["documents"])
        cursor = page.get("next_cursor")
        if not cursor or not page["documents"]:
            break
    if seen != state["mine"]:
        sys.exit(f"owner query: the user owns {state['mine']} documents, paging saw {seen}")
    write(out, "owner_headers.txt", f"Authorization: Bearer {state['token']}\n")
    print(f"basalt todos: {state['count']} documents, {state['mine']} owned by the bench user")


def main(argv):
    cmd, url, out = argv[1], argv[2], argv[3]
    if cmd == "pocketbase":
        pocketbase(url, out, int(argv[4]))
    elif cmd == "parse":
        parse(url, out, int(argv[4]))
    elif cmd == "basalt":
        basalt(url, out, int(argv[4]), argv[5])
    elif cmd == "basalt-owner":
        basalt_owner(url, out, int(argv[4]), argv[5])
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main(sys.argv)
