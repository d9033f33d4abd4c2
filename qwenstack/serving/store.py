"""Chat history in SQLite: conversations, their messages and their settings.

Design notes:
- One connection guarded by a lock, opened with check_same_thread=False: FastAPI runs sync endpoints on a
  thread pool, and chat writes are tiny, so serialising them costs nothing and rules out "database is locked".
- WAL journal with synchronous=FULL, and every public write is one transaction (`_tx`): a process killed
  mid-answer loses at most the write in flight, never an earlier conversation.
- Structured fields (tool calls, attachments, metrics, guard verdicts, settings) are JSON text columns; the
  store does not interpret them, store_api validates them.
- Messages are ordered by a per-conversation `position`; truncation (regenerate, edit-and-resend) deletes by
  position.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT,
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT,
    tool_calls TEXT,
    tool_call_id TEXT,
    name TEXT,
    attachments TEXT,
    metrics TEXT,
    model TEXT,
    finish_reason TEXT,
    guard TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    UNIQUE (conversation_id, position)
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, position);
CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations(updated_at DESC);
"""

# Message columns a caller may set; JSON-valued ones are (de)serialised here.
MESSAGE_FIELDS = (
    "role", "content", "reasoning", "tool_calls", "tool_call_id", "name", "attachments", "metrics", "model",
    "finish_reason", "guard", "error",
)
_JSON_MESSAGE_FIELDS = frozenset({"tool_calls", "attachments", "metrics", "guard"})


class NotFound(KeyError):
    """A conversation or message id that the store does not hold."""


def default_db_path() -> Path:
    """$QWENSTACK_HOME/chats.db when set, else ~/.local/share/qwenstack/chats.db (XDG_DATA_HOME honoured)."""
    home = os.environ.get("QWENSTACK_HOME")
    if home:
        return Path(home).expanduser() / "chats.db"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "qwenstack" / "chats.db"


def _new_id() -> str:
    return uuid.uuid4().hex


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ChatStore:
    """Conversations and messages in one SQLite file. Safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_db_path()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Chats are private: the file (and the -wal/-shm files SQLite gives the same mode) is 0600.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction spans exactly one write call.
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer qwenstack (schema {version} > {SCHEMA_VERSION})")
            with self._tx() as cur:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    cur.execute(statement)
                cur.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "ChatStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction: committed whole on success, rolled back whole on any exception."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- conversations -------------------------------------------------------------------------------------

    @staticmethod
    def _conversation(row: sqlite3.Row) -> dict[str, Any]:
        out = {
            "id": row["id"], "title": row["title"], "model": row["model"],
            "settings": json.loads(row["settings"]), "created_at": row["created_at"],
            "updated_at": row["updated_at"],
        }
        if "message_count" in row.keys():
            out["message_count"] = row["message_count"]
        return out

    def create_conversation(self, title: str = "New chat", model: str | None = None,
                            settings: dict[str, Any] | None = None) -> dict[str, Any]:
        now = time.time()
        cid = _new_id()
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO conversations (id, title, model, settings, created_at, updated_at) VALUES (?,?,?,?,?,?)",
                (cid, title, model, _dump(settings or {}), now, now))
        return self.get_conversation(cid, with_messages=False)

    def list_conversations(self, query: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Newest first. `query` matches title or any message text, case-insensitively (ASCII)."""
        count = "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
        if query:
            like = f"%{_escape_like(query)}%"
            rows = self._read(
                f"SELECT c.*, {count} FROM conversations c WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS ("
                " SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND"
                " (m.content LIKE ? ESCAPE '\\' OR m.reasoning LIKE ? ESCAPE '\\'))"
                " ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ? OFFSET ?",
                (like, like, like, limit, offset))
        else:
            rows = self._read(
                f"SELECT c.*, {count} FROM conversations c ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ? OFFSET ?",
                (limit, offset))
        return [self._conversation(r) for r in rows]

    def get_conversation(self, cid: str, with_messages: bool = True) -> dict[str, Any]:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (cid,))
        if not rows:
            raise NotFound(cid)
        conv = self._conversation(rows[0])
        if with_messages:
            conv["messages"] = self.list_messages(cid)
        return conv

    def update_conversation(self, cid: str, *, title: str | None = None, model: str | None = None,
                            settings: dict[str, Any] | None = None) -> dict[str, Any]:
        sets, params = ["updated_at = ?"], [time.time()]
        if title is not None:
            sets.append("title = ?"); params.append(title)
        if model is not None:
            sets.append("model = ?"); params.append(model)
        if settings is not None:
            sets.append("settings = ?"); params.append(_dump(settings))
        with self._tx() as cur:
            cur.execute(f"UPDATE conversations SET {', '.join(sets)} WHERE id = ?", (*params, cid))
            if cur.rowcount == 0:
                raise NotFound(cid)
        return self.get_conversation(cid, with_messages=False)

    def delete_conversation(self, cid: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM conversations WHERE id = ?", (cid,))
            if cur.rowcount == 0:
                raise NotFound(cid)

    # -- messages ------------------------------------------------------------------------------------------

    @staticmethod
    def _message(row: sqlite3.Row) -> dict[str, Any]:
        out: dict[str, Any] = {"id": row["id"], "conversation_id": row["conversation_id"], "position": row["position"]}
        for field in MESSAGE_FIELDS:
            out[field] = _load(row[field]) if field in _JSON_MESSAGE_FIELDS else row[field]
        out["created_at"] = row["created_at"]
        return out

    def list_messages(self, cid: str) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY position", (cid,))
        return [self._message(r) for r in rows]

    def get_message(self, cid: str, mid: str) -> dict[str, Any]:
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? AND id = ?", (cid, mid))
        if not rows:
            raise NotFound(mid)
        return self._message(rows[0])

    @staticmethod
    def _touch(cur: sqlite3.Cursor, cid: str) -> None:
        cur.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), cid))
        if cur.rowcount == 0:
            raise NotFound(cid)

    @staticmethod
    def _insert(cur: sqlite3.Cursor, cid: str, position: int, message: dict[str, Any]) -> str:
        mid = _new_id()
        values = [_dump(message.get(f)) if f in _JSON_MESSAGE_FIELDS else message.get(f) for f in MESSAGE_FIELDS]
        values[MESSAGE_FIELDS.index("content")] = message.get("content") or ""
        cur.execute(
            f"INSERT INTO messages (id, conversation_id, position, {', '.join(MESSAGE_FIELDS)}, created_at)"
            f" VALUES (?, ?, ?, {', '.join('?' * len(MESSAGE_FIELDS))}, ?)",
            (mid, cid, position, *values, time.time()))
        return mid

    def append_messages(self, cid: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append in order, all or none."""
        with self._tx() as cur:
            self._touch(cur, cid)
            (last,) = cur.execute(
                "SELECT COALESCE(MAX(position), -1) FROM messages WHERE conversation_id = ?", (cid,)).fetchone()
            mids = [self._insert(cur, cid, last + 1 + i, m) for i, m in enumerate(messages)]
        return [self.get_message(cid, mid) for mid in mids]

    def append_message(self, cid: str, message: dict[str, Any]) -> dict[str, Any]:
        return self.append_messages(cid, [message])[0]

    def replace_message(self, cid: str, mid: str, message: dict[str, Any]) -> dict[str, Any]:
        """Overwrite every field of one message (its id and position stay)."""
        values = [_dump(message.get(f)) if f in _JSON_MESSAGE_FIELDS else message.get(f) for f in MESSAGE_FIELDS]
        values[MESSAGE_FIELDS.index("content")] = message.get("content") or ""
        with self._tx() as cur:
            self._touch(cur, cid)
            cur.execute(
                f"UPDATE messages SET {', '.join(f + ' = ?' for f in MESSAGE_FIELDS)}"
                " WHERE conversation_id = ? AND id = ?", (*values, cid, mid))
            if cur.rowcount == 0:
                raise NotFound(mid)
        return self.get_message(cid, mid)

    def replace_messages(self, cid: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace the whole message list of a conversation in one transaction."""
        with self._tx() as cur:
            self._touch(cur, cid)
            cur.execute("DELETE FROM messages WHERE conversation_id = ?", (cid,))
            for i, m in enumerate(messages):
                self._insert(cur, cid, i, m)
        return self.list_messages(cid)

    def truncate(self, cid: str, keep: int) -> list[dict[str, Any]]:
        """Keep the first `keep` messages and delete the rest (regenerate, edit-and-resend)."""
        with self._tx() as cur:
            self._touch(cur, cid)
            cur.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (cid, keep))
        return self.list_messages(cid)
