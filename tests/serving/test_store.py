"""The chat store (SQLite) and its /api/ router: CRUD, search, concurrency, durability, refusals."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwenstack.serving.store import ChatStore, NotFound, default_db_path
from qwenstack.serving.store_api import mount_ui

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chats.db"


@pytest.fixture
def store(db: Path):
    s = ChatStore(db)
    yield s
    s.close()


@pytest.fixture
def client(store: ChatStore) -> TestClient:
    app = FastAPI()
    mount_ui(app, store)
    return TestClient(app)


def snapshot(path: Path) -> tuple[list[tuple], list[tuple]]:
    """Every row of both tables, read through a separate connection."""
    conn = sqlite3.connect(path)
    try:
        convs = conn.execute("SELECT * FROM conversations ORDER BY id").fetchall()
        msgs = conn.execute("SELECT * FROM messages ORDER BY conversation_id, position").fetchall()
        return convs, msgs
    finally:
        conn.close()


def test_default_path_follows_qwenstack_home(monkeypatch, tmp_path):
    monkeypatch.setenv("QWENSTACK_HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / "chats.db"
    monkeypatch.delenv("QWENSTACK_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "qwenstack" / "chats.db"


def test_database_is_in_wal_mode(store, db):
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_conversation_crud_through_the_api(client):
    r = client.post("/api/conversations", json={"title": "Trip plans", "model": "qwen3-0.6b",
                                                "settings": {"temperature": 0.6, "enable_thinking": False}})
    assert r.status_code == 201
    conv = r.json()
    cid = conv["id"]
    assert conv["settings"] == {"system_prompt": "", "temperature": 0.6, "top_p": None, "max_tokens": None,
                                "thinking_budget": None, "enable_thinking": False}

    user = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": "Where to?"}).json()
    answer = {
        "role": "assistant", "content": "Lisbon.", "reasoning": "They like the sea.", "model": "qwen3-0.6b",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{}"}}],
        "metrics": {"ttft_s": 0.12, "tokens_per_s": 41.5, "completion_tokens": 20}, "finish_reason": "stop",
    }
    r = client.post(f"/api/conversations/{cid}/messages", json=answer)
    assert r.status_code == 201
    stored = r.json()
    assert (user["position"], stored["position"]) == (0, 1)
    assert stored["tool_calls"][0]["function"]["name"] == "search"
    assert stored["metrics"]["tokens_per_s"] == 41.5 and stored["reasoning"] == "They like the sea."

    listed = client.get("/api/conversations").json()["data"]
    assert [(c["id"], c["title"], c["message_count"]) for c in listed] == [(cid, "Trip plans", 2)]

    assert client.patch(f"/api/conversations/{cid}", json={"title": "Lisbon trip"}).json()["title"] == "Lisbon trip"
    settings = {"system_prompt": "Be brief.", "temperature": 0.2, "top_p": 0.9, "max_tokens": 256,
                "thinking_budget": 512, "enable_thinking": True}
    assert client.put(f"/api/conversations/{cid}/settings", json=settings).json() == settings

    full = client.get(f"/api/conversations/{cid}").json()
    assert full["title"] == "Lisbon trip" and full["settings"] == settings
    assert [m["content"] for m in full["messages"]] == ["Where to?", "Lisbon."]

    # Replace one message (the page does this for edit-and-resend), then cut the tail (regenerate).
    r = client.put(f"/api/conversations/{cid}/messages/{user['id']}", json={"role": "user", "content": "Where now?"})
    assert r.json()["content"] == "Where now?" and r.json()["position"] == 0
    assert [m["role"] for m in client.post(f"/api/conversations/{cid}/truncate", json={"keep": 1}).json()["data"]] == ["user"]
    r = client.put(f"/api/conversations/{cid}/messages", json={"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    assert [(m["position"], m["content"]) for m in r.json()["data"]] == [(0, "a"), (1, "b")]

    r = client.delete(f"/api/conversations/{cid}")
    assert r.json() == {"id": cid, "object": "conversation.deleted", "deleted": True}
    r = client.get(f"/api/conversations/{cid}")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
    assert client.get("/api/conversations").json()["data"] == []


def test_guard_verdicts_and_attachments_round_trip(client):
    cid = client.post("/api/conversations", json={}).json()["id"]
    image = "data:image/png;base64,iVBORw0KGgo="
    client.post(f"/api/conversations/{cid}/messages", json={
        "role": "user", "content": "look", "attachments": [{"kind": "image", "name": "a.png", "mime": "image/png",
                                                             "data_url": image}]})
    guard = {"direction": "answer", "safety": "Unsafe", "categories": ["Violent"], "action": "block", "score": 0.97}
    client.post(f"/api/conversations/{cid}/messages", json={
        "role": "assistant", "content": "", "guard": guard, "finish_reason": "content_filter"})
    messages = client.get(f"/api/conversations/{cid}").json()["messages"]
    assert messages[0]["attachments"][0]["data_url"] == image
    assert messages[1]["guard"] == guard  # extra fields a guard adds are kept


def test_search_matches_titles_and_message_text(client):
    ids = {}
    for title, text in [("Cooking", "How long do I boil an egg?"), ("Rust help", "borrow checker 100% confusing"),
                        ("Misc", "snake_case or camelCase")]:
        cid = client.post("/api/conversations", json={"title": title}).json()["id"]
        client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": text})
        ids[title] = cid
    client.post(f"/api/conversations/{ids['Misc']}/messages",
                json={"role": "assistant", "content": "Either.", "reasoning": "PEP 8 prefers snake_case"})

    def found(q: str) -> set[str]:
        return {c["title"] for c in client.get("/api/conversations", params={"q": q}).json()["data"]}

    assert found("cooking") == {"Cooking"}          # title, case-insensitive
    assert found("EGG") == {"Cooking"}              # message text
    assert found("pep 8") == {"Misc"}               # reasoning
    assert found("100%") == {"Rust help"}           # % is literal, not a wildcard
    assert found("e_c") == {"Misc"}                 # _ is literal too
    assert found("0% c") == {"Rust help"}
    assert found("%") == {"Rust help"}
    assert found("nothing like this") == set()
    assert len(client.get("/api/conversations", params={"limit": 2}).json()["data"]) == 2


def test_concurrent_writes_to_two_conversations(store, db):
    a = store.create_conversation("A")["id"]
    b = store.create_conversation("B")["id"]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(cid: str, tag: str) -> None:
        try:
            start.wait()
            for i in range(150):
                store.append_message(cid, {"role": "user" if i % 2 == 0 else "assistant", "content": f"{tag}{i}"})
                if i % 25 == 0:
                    store.update_conversation(cid, title=f"{tag} after {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(a, "a")), threading.Thread(target=writer, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for cid, tag in ((a, "a"), (b, "b")):
        messages = store.list_messages(cid)
        assert [m["position"] for m in messages] == list(range(150))
        assert [m["content"] for m in messages] == [f"{tag}{i}" for i in range(150)]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_concurrent_api_writes_from_two_threads(client):
    a = client.post("/api/conversations", json={"title": "A"}).json()["id"]
    b = client.post("/api/conversations", json={"title": "B"}).json()["id"]
    statuses: list[int] = []

    def writer(cid: str) -> None:
        for i in range(25):
            r = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": f"{cid}:{i}"})
            statuses.append(r.status_code)

    threads = [threading.Thread(target=writer, args=(cid,)) for cid in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [201] * 50
    for cid in (a, b):
        assert [m["content"] for m in client.get(f"/api/conversations/{cid}").json()["messages"]] == \
            [f"{cid}:{i}" for i in range(25)]


def test_data_survives_a_restart(db):
    first = ChatStore(db)
    app = FastAPI()
    mount_ui(app, first)
    c = TestClient(app)
    cid = c.post("/api/conversations", json={"title": "Keep me", "settings": {"max_tokens": 99}}).json()["id"]
    c.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": "hello"})
    c.post(f"/api/conversations/{cid}/messages", json={"role": "assistant", "content": "hi", "reasoning": "greet"})
    before = c.get(f"/api/conversations/{cid}").json()
    first.close()

    second = ChatStore(db)  # a new server process opening the same file
    app2 = FastAPI()
    mount_ui(app2, second)
    after = TestClient(app2).get(f"/api/conversations/{cid}").json()
    second.close()
    assert after == before
    assert after["settings"]["max_tokens"] == 99


def test_a_crash_mid_write_keeps_earlier_conversations(db):
    # A child process commits one conversation, then dies (os._exit, no cleanup) inside the next write.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from qwenstack.serving.store import ChatStore
        store = ChatStore({str(db)!r})
        cid = store.create_conversation("Committed")["id"]
        store.append_messages(cid, [{{"role": "user", "content": "q"}}, {{"role": "assistant", "content": "a"}}])
        with store._tx() as cur:
            cur.execute("INSERT INTO conversations (id, title, settings, created_at, updated_at)"
                        " VALUES ('half', 'Half written', '{{}}', 0, 0)")
            cur.execute("UPDATE messages SET content = 'CORRUPTED' WHERE conversation_id = ?", (cid,))
            os._exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr

    store = ChatStore(db)
    try:
        convs = store.list_conversations()
        assert [c["title"] for c in convs] == ["Committed"]
        assert [m["content"] for m in store.list_messages(convs[0]["id"])] == ["q", "a"]
        with pytest.raises(NotFound):
            store.get_conversation("half")
    finally:
        store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_a_failed_batch_write_is_all_or_nothing(store):
    cid = store.create_conversation("x")["id"]
    store.append_message(cid, {"role": "user", "content": "keep"})
    with pytest.raises(NotFound):
        store.append_messages("missing", [{"role": "user", "content": "lost"}])
    with pytest.raises(sqlite3.IntegrityError):
        store.append_messages(cid, [{"role": "user", "content": "one"}, {"role": None, "content": "bad"}])
    assert [m["content"] for m in store.list_messages(cid)] == ["keep"]


MALFORMED = [
    ("post", "/api/conversations", b"{not json", "json"),
    ("post", "/api/conversations", [1, 2], None),
    ("post", "/api/conversations", {"title": ""}, "title"),
    ("post", "/api/conversations", {"title": "x" * 201}, "title"),
    ("post", "/api/conversations", {"title": "ok", "colour": "red"}, "colour"),
    ("post", "/api/conversations", {"settings": {"temperature": 5}}, "settings.temperature"),
    ("post", "/api/conversations", {"settings": {"temperature": "0.7"}}, "settings.temperature"),
    ("post", "/api/conversations", {"settings": {"max_tokens": True}}, "settings.max_tokens"),
    ("post", "/api/conversations", {"settings": {"top_p": 0}}, "settings.top_p"),
    ("patch", "/api/conversations/{cid}", {}, None),
    ("patch", "/api/conversations/{cid}", {"title": None, "settings": {"thinking_budget": -1}}, "settings.thinking_budget"),
    ("put", "/api/conversations/{cid}/settings", {"enable_thinking": "yes"}, "enable_thinking"),
    ("post", "/api/conversations/{cid}/messages", {"role": "robot", "content": "hi"}, "role"),
    ("post", "/api/conversations/{cid}/messages", {"role": "user", "content": 42}, "content"),
    ("post", "/api/conversations/{cid}/messages", {"role": "tool", "content": "result"}, None),
    ("post", "/api/conversations/{cid}/messages", {"role": "user", "attachments": [
        {"kind": "image", "mime": "image/png", "data_url": "https://example.invalid/a.png"}]}, "attachments.0.data_url"),
    ("post", "/api/conversations/{cid}/messages", {"role": "assistant", "metrics": {"ttft_s": -1}}, "metrics.ttft_s"),
    ("post", "/api/conversations/{cid}/messages", {"role": "assistant", "guard": {"direction": "sideways",
                                                                                  "safety": "Unsafe"}}, "guard.direction"),
    ("put", "/api/conversations/{cid}/messages", {"messages": [{"role": "user", "content": "fine"},
                                                               {"role": "nobody"}]}, "messages.1.role"),
    ("put", "/api/conversations/{cid}/messages/{mid}", {"role": "user", "content": None}, "content"),
    ("post", "/api/conversations/{cid}/truncate", {"keep": -1}, "keep"),
    ("post", "/api/conversations/{cid}/truncate", {"keep": 1.5}, "keep"),
    ("get", "/api/conversations?limit=0", None, "limit"),
]


@pytest.mark.parametrize("method,path,body,param", MALFORMED, ids=[f"{m} {p} {i}" for i, (m, p, _, _) in enumerate(MALFORMED)])
def test_malformed_requests_get_a_4xx_and_change_nothing(client, db, method, path, body, param):
    cid = client.post("/api/conversations", json={"title": "Untouched"}).json()["id"]
    mid = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": "original"}).json()["id"]
    before = snapshot(db)
    url = path.format(cid=cid, mid=mid)
    if isinstance(body, bytes):
        r = client.request(method, url, content=body, headers={"Content-Type": "application/json"})
    elif body is None:
        r = client.request(method, url)
    else:
        r = client.request(method, url, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param == "json":
        assert "not valid JSON" in error["message"]
    elif param is not None:
        assert error["param"] == param, error
    assert snapshot(db) == before


def test_an_oversized_body_is_refused_before_it_is_read(client, db, monkeypatch):
    import qwenstack.serving.store_api as store_api

    monkeypatch.setattr(store_api, "MAX_BODY_BYTES", 1000)
    before = snapshot(db)
    r = client.post("/api/conversations", json={"title": "x" * 50, "settings": {"system_prompt": "y" * 2000}})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"
    assert snapshot(db) == before


@pytest.mark.parametrize("method,path,body", [
    ("get", "/api/conversations/nope", None),
    ("patch", "/api/conversations/nope", {"title": "x"}),
    ("delete", "/api/conversations/nope", None),
    ("post", "/api/conversations/nope/messages", {"role": "user", "content": "x"}),
    ("put", "/api/conversations/{cid}/messages/nope", {"role": "user", "content": "x"}),
    ("post", "/api/conversations/nope/truncate", {"keep": 0}),
])
def test_unknown_ids_get_a_404_and_change_nothing(client, db, method, path, body):
    cid = client.post("/api/conversations", json={"title": "Untouched"}).json()["id"]
    before = snapshot(db)
    r = client.request(method, path.format(cid=cid), json=body) if body else client.request(method, path)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
    assert snapshot(db) == before
