"""OpenAI's Conversations API: a conversation's items kept on the server, which a response created with
`conversation` reads as its history and extends with its input and output items. What the SDK's
`client.conversations` and openai-agents' OpenAIConversationsSession call:

    POST /v1/conversations                       create (with up to 20 first items, metadata)
    GET | POST | DELETE /v1/conversations/{id}   retrieve, update the metadata, delete
    GET | POST /v1/conversations/{id}/items      list (paged as input items are), append up to 20
    GET | DELETE /v1/conversations/{id}/items/{item_id}

Decisions:
- Items are stored as /v1/responses stores input items (an id on each, a message's text as one part), in the
  same SQLite file (store.py); a deleted conversation takes its items with it.
- A response with `conversation` cannot also name previous_response_id (OpenAI refuses both). Its input and
  output items are appended when it ends completed or incomplete (not when it failed), whatever its `store`.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from qwenstack.serving.errors import APIError
from qwenstack.serving.responses.events import new_id
from qwenstack.serving.responses.protocol import InputItem, _In
from qwenstack.serving.responses.store import ResponseStore, item_page, stored_items

router = APIRouter()
MAX_NEW_ITEMS = 20  # items a create or an append may carry, OpenAI's limit


class ConversationCreate(_In):
    items: list[InputItem] | None = Field(None, max_length=MAX_NEW_ITEMS)
    metadata: dict[str, str] | None = None


class ConversationUpdate(_In):
    metadata: dict[str, str]


class ItemsCreate(_In):
    items: list[InputItem] = Field(min_length=1, max_length=MAX_NEW_ITEMS)


def not_found(conversation_id: str) -> APIError:
    return APIError(404, f"no conversation with id '{conversation_id}' is stored here", param="conversation_id",
                    code="not_found")


def _store(request: Request) -> ResponseStore:
    return request.app.state.qwenstack_responses.store


def conversation_items(store: ResponseStore, conversation_id: str) -> list[dict[str, Any]]:
    """The conversation's items, oldest first; 404 for an unknown conversation."""
    items = store.items(conversation_id)
    if items is None:
        raise not_found(conversation_id)
    return items


def _new_items(items: list[Any]) -> list[dict[str, Any]]:
    return stored_items([item.model_dump(exclude_none=True, by_alias=True) for item in items])


@router.post("/v1/conversations")
async def create_conversation(request: Request, body: ConversationCreate) -> JSONResponse:
    store = _store(request)
    conversation = store.create_conversation(new_id("conv"), body.metadata or {})
    if body.items:
        store.add_items(conversation["id"], _new_items(body.items))
    return JSONResponse(conversation)


@router.get("/v1/conversations/{conversation_id}")
async def retrieve_conversation(request: Request, conversation_id: str) -> JSONResponse:
    conversation = _store(request).get_conversation(conversation_id)
    if conversation is None:
        raise not_found(conversation_id)
    return JSONResponse(conversation)


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(request: Request, conversation_id: str, body: ConversationUpdate) -> JSONResponse:
    conversation = _store(request).update_conversation(conversation_id, body.metadata)
    if conversation is None:
        raise not_found(conversation_id)
    return JSONResponse(conversation)


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(request: Request, conversation_id: str) -> JSONResponse:
    if not _store(request).delete_conversation(conversation_id):
        raise not_found(conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(request: Request, conversation_id: str, limit: int = Query(20, ge=1, le=100),
                     order: Literal["asc", "desc"] = "desc", after: str | None = None) -> JSONResponse:
    return JSONResponse(item_page(conversation_items(_store(request), conversation_id), limit, order, after))


@router.post("/v1/conversations/{conversation_id}/items")
async def create_items(request: Request, conversation_id: str, body: ItemsCreate) -> JSONResponse:
    items = _new_items(body.items)
    if not _store(request).add_items(conversation_id, items):
        raise not_found(conversation_id)
    return JSONResponse({"object": "list", "data": items, "first_id": items[0]["id"], "last_id": items[-1]["id"],
                         "has_more": False})


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def retrieve_item(request: Request, conversation_id: str, item_id: str) -> JSONResponse:
    found = [i for i in conversation_items(_store(request), conversation_id) if i["id"] == item_id]
    if not found:
        raise APIError(404, f"no item '{item_id}' in conversation '{conversation_id}'", param="item_id",
                       code="not_found")
    return JSONResponse(found[0])


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(request: Request, conversation_id: str, item_id: str) -> JSONResponse:
    store = _store(request)
    conversation = store.get_conversation(conversation_id)
    if conversation is None:
        raise not_found(conversation_id)
    if not store.delete_item(conversation_id, item_id):
        raise APIError(404, f"no item '{item_id}' in conversation '{conversation_id}'", param="item_id",
                       code="not_found")
    return JSONResponse(conversation)
