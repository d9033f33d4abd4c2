"""Ollama's native API (/api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/version; /api/ps is
introspect.py's) on top of the chat and embedding pipelines, so Ollama's clients (the `ollama` package, Open WebUI,
Continue, LangChain's ChatOllama) work against qwenstack with OLLAMA_HOST pointing at it: requests are translated to
chat requests (translate.py), each runs as one chat turn whose output becomes NDJSON lines (api.py); models.py says
what the model routes say about a model; protocol.py holds the bodies."""
