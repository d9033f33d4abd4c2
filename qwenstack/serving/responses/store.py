"""Stored responses and conversations in SQLite, a sibling of the chat page's store (responses.db next to
chats.db).

One row per response: the response object as returned (JSON), the input items of its request, and the link to
its previous response, so `previous_response_id` rebuilds the conversation by walking the links back. A
conversation (OpenAI's Conversations API) is a row of metadata and its items in order, each one row. Writes are
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

from qwenstack.serving.responses.events import new_id
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
_CONVERSATIONS = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_items (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
CREATE INDEX IF NOT EXISTS conversation_item_ids ON conversation_items (conversation_id, item_id);
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
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute(_SCHEMA)
            self._conn.executescript(_CONVERSATIONS)

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

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        """A stored item by id: an output or input item of a stored response, or a conversation's item (None if
        none has it). Responses are matched on their JSON text first, newest first, then their items compared."""
        with self._lock:
            row = self._conn.execute("SELECT item FROM conversation_items WHERE item_id = ? LIMIT 1",
                                     (item_id,)).fetchone()
            if row is not None:
                return json.loads(row[0])
            needle = "%" + json.dumps(item_id) + "%"
            rows = self._conn.execute("SELECT body, input_items FROM responses WHERE body LIKE ? OR input_items "
                                      "LIKE ? ORDER BY created_at DESC", (needle, needle)).fetchall()
        for body, inputs in rows:
            for item in (json.loads(body).get("output") or []) + json.loads(inputs):
                if item.get("id") == item_id:
                    return item
        return None

    # --- conversations ----------------------------------------------------------------------------------

    def create_conversation(self, conversation_id: str, metadata: dict[str, str]) -> dict[str, Any]:
        created = int(time.time())
        with self._lock:
            self._conn.execute("INSERT INTO conversations (id, metadata, created_at) VALUES (?, ?, ?)",
                               (conversation_id, json.dumps(metadata), created))
        return _conversation(conversation_id, metadata, created)

    def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT metadata, created_at FROM conversations WHERE id = ?",
                                     (conversation_id,)).fetchone()
        return _conversation(conversation_id, json.loads(row[0]), row[1]) if row else None

    def update_conversation(self, conversation_id: str, metadata: dict[str, str]) -> dict[str, Any] | None:
        with self._lock:
            changed = self._conn.execute("UPDATE conversations SET metadata = ? WHERE id = ?",
                                         (json.dumps(metadata), conversation_id)).rowcount
        return self.get_conversation(conversation_id) if changed else None

    def delete_conversation(self, conversation_id: str) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    def add_items(self, conversation_id: str, items: list[dict[str, Any]]) -> bool:
        """Appends the items (each with its id) in order; False for an unknown conversation."""
        with self._lock:
            if not self._has_conversation(conversation_id):
                return False
            last = self._conn.execute("SELECT COALESCE(MAX(position), -1) FROM conversation_items "
                                      "WHERE conversation_id = ?", (conversation_id,)).fetchone()[0]
            self._conn.executemany(
                "INSERT INTO conversation_items (conversation_id, position, item_id, item) VALUES (?, ?, ?, ?)",
                [(conversation_id, last + 1 + i, item["id"], json.dumps(item)) for i, item in enumerate(items)])
        return True

    def items(self, conversation_id: str) -> list[dict[str, Any]] | None:
        """The conversation's items, oldest first (None for an unknown conversation)."""
        with self._lock:
            if not self._has_conversation(conversation_id):
                return None
            rows = self._conn.execute("SELECT item FROM conversation_items WHERE conversation_id = ? "
                                      "ORDER BY position", (conversation_id,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def _has_conversation(self, conversation_id: str) -> bool:  # under the lock
        return self._conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is not None

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ?",
                                      (conversation_id, item_id)).rowcount > 0


def _conversation(conversation_id: str, metadata: dict[str, str], created_at: int) -> dict[str, Any]:
    return {"id": conversation_id, "object": "conversation", "created_at": created_at, "metadata": metadata}


def stored_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as they are stored and listed, as OpenAI does: a message's text as one part, an id on each."""
    prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs",
                "mcp_approval_response": "mcpa", "mcp_call": "mcp", "mcp_list_tools": "mcpl"}
    for item in items:
        item.setdefault("type", "message")
        if item["type"] == "message" and isinstance(item.get("content"), str):  # stored (and listed) as OpenAI does
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        if not item.get("id"):
            item["id"] = new_id(prefixes.get(item["type"], "item"))
    return items


def item_page(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> dict[str, Any]:
    """One page of a list of items in OpenAI's list shape (newest first with order desc; `after` an item id)."""
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
