"""POST /v1/responses (OpenAI's Responses API) on top of the chat pipeline: items are translated to chat
messages (translate.py), each model turn runs through serving/chat.py's plan and parser (turns.py), the event
state machine (events.py) yields the streamed events, responses are stored in SQLite (store.py), and MCP
servers run tools inside the request (mcp_tools.py, loop.py). api.py holds the routes."""
