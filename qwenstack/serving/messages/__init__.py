"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) on top of the chat pipeline, so Claude
Code and the `anthropic` SDK work against qwenstack: requests are translated to chat requests (translate.py),
each runs as one chat turn and its output becomes content blocks and stream events (api.py); protocol.py holds the
bodies."""
