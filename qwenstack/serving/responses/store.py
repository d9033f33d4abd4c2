"""Stored responses in SQLite, a sibling of the chat page's store (responses.db next to chats.db).

One row per response: the response object as returned (JSON), the input items of its request, and the link to
its previous response, so `previous_response_id` rebuilds the conversation by walking the links back. Writes are
tiny and serialised under a lock on one connection (as in serving/store.py); WAL keeps readers unblocked.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from qwenstack.serving.store import default_db_path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    previous_response_id TEXT,
    body TEXT NOT NULL,
    input_items TEXT NOT NULL,
    instructions TEXT,
    created_at REAL NOT NULL
)
"""
MAX_CHAIN = 10_000  # links walked back at most (a guard against a cycle written by hand)


def default_responses_path() -> Path:
    return default_db_path().with_name("responses.db")


class ResponseStore:
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_responses_path()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def save(self, body: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Inserts or replaces the response (a background response is saved when queued and when done)."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO responses (id, previous_response_id, body, input_items, instructions, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                (body["id"], body.get("previous_response_id"), json.dumps(body), json.dumps(input_items),
                 body.get("instructions"), time.time()))

    def get(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT body FROM responses WHERE id = ?", (response_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            row = self._conn.execute("SELECT input_items FROM responses WHERE id = ?", (response_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every item of the conversation up to and including this response's output, oldest first (None if the
        id is unknown). A deleted response in the middle of a chain ends the walk there."""
        chain: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
        current: str | None = response_id
        with self._lock:
            while current is not None and len(chain) < MAX_CHAIN:
                row = self._conn.execute("SELECT previous_response_id, body, input_items FROM responses WHERE id = ?",
                                         (current,)).fetchone()
                if row is None:
                    if not chain:
                        return None
                    break
                chain.append((json.loads(row[2]), json.loads(row[1]).get("output") or []))
                current = row[0]
        items: list[dict[str, Any]] = []
        for inputs, outputs in reversed(chain):
            items += inputs + outputs
        return items
