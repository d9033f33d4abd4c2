"""`qwenstack chat [MODEL]`: an interactive chat in the terminal, in-process (no server).

Each reply is streamed by stepping the engine directly (add_request, then step() until the request
finishes) and split into thinking and answer by the same incremental parser the server uses. The history
keeps assistant turns with `reasoning_content`, so the chat template decides what earlier thinking to
drop, as it does for API clients. Reads lines from stdin when it is not a terminal, so it can be piped:
`printf 'Hello\\n/exit\\n' | qwenstack chat --seed 0`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterator, TextIO

from qwenstack.commands import Command
from qwenstack.commands._common import add_chat_template_option, add_model_options, add_sampling_options

HELP = """commands:
  /think      turn thinking on for the next replies
  /no_think   turn thinking off for the next replies
  /show       print the last reply's thinking in full
  /clear      start a new conversation (keeps the system message)
  /help       this list
  /exit       quit (also /bye, Ctrl-D)
  \"\"\"         start and end a multi-line message"""
COMMAND_WORDS = ("/think", "/no_think", "/show", "/clear", "/help", "/?", "/exit", "/bye", "/quit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = HELP + "\n\nexample:\n  printf 'Hello\\n/exit\\n' | qwenstack chat --seed 0"
    parser.add_argument("model", nargs="?", default=None, help="model id or directory (default: the demo model)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--no-think", action="store_true", help="start with thinking off (toggle with /think)")
    parser.add_argument("--show-thinking", action="store_true",
                        help="keep the thinking on screen instead of folding it")
    add_sampling_options(parser, max_tokens=None)
    add_model_options(parser)
    add_chat_template_option(parser)


class ChatSession:
    """The conversation, the thinking switch, and one streamed reply at a time."""

    def __init__(self, llm: Any, args: argparse.Namespace, out: TextIO, *, live: bool, color: bool) -> None:
        self.llm = llm
        self.args = args
        self.out = out
        self.live = live
        self.color = color
        self.enable_thinking = not args.no_think
        self.messages: list[dict[str, Any]] = []
        self.last_reasoning: str | None = None
        self.turns = 0
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []
        self.last_reasoning = None

    def command(self, line: str) -> bool:
        """Runs a /command; False means quit."""
        from qwenstack.commands._chat_view import DIM, RESET

        word = line.strip()
        if word in ("/exit", "/bye", "/quit"):
            return False
        if word == "/think":
            self.enable_thinking = True
            self.say("Thinking on.")
        elif word == "/no_think":
            self.enable_thinking = False
            self.say("Thinking off.")
        elif word == "/clear":
            self.clear()
            self.say("Cleared the conversation.")
        elif word == "/show":
            if self.last_reasoning:
                self.out.write(f"{DIM}{self.last_reasoning}{RESET}\n" if self.color else self.last_reasoning + "\n")
            else:
                self.say("(the last reply had no thinking)")
        else:
            self.say(HELP)
        return True

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def reply(self, user_text: str) -> None:
        from qwenstack.commands._chat_view import ReplyView
        from qwenstack.commands._common import sampling_params, starts_in_reasoning
        from qwenstack.errors import RequestError
        from qwenstack.serving.parsers import ChatOutputParser

        tokenizer, engine = self.llm.tokenizer, self.llm.engine
        seed = None if self.args.seed is None else self.args.seed + self.turns
        params = sampling_params(self.args, self.llm.loaded.path, thinking=self.enable_thinking, seed=seed)
        messages, prompt, ids, dropped = self._fitting(user_text, params.max_tokens)
        room = getattr(engine, "max_model_len", None)
        if room is not None and params.max_tokens is not None and 0 < room - len(ids) < params.max_tokens:
            params.max_tokens = room - len(ids)  # the reply stops at the context's end ("length")
        request_id = f"chat-{self.turns}"
        self.turns += 1
        try:
            engine.add_request(request_id, ids, params)
        except RequestError as exc:  # nothing was dropped (the history is kept); /clear helps only with one
            self.say(f"error: {exc}." + (" /clear starts a new conversation." if self.messages else ""))
            return
        if dropped:
            self.say(f"(the {dropped} oldest messages no longer fit the context: dropped, as Ollama does)")
        parser = ChatOutputParser(starts_in_reasoning=starts_in_reasoning(prompt))
        view = ReplyView(self.out, live=self.live, color=self.color, show_thinking=self.args.show_thinking,
                         count_tokens=lambda text: len(tokenizer.encode(text)))
        note = None
        try:
            finish_reason = None
            while engine.has_unfinished_requests():
                for output in engine.step():
                    sample = output.outputs[0]
                    self._show(view, parser.feed(sample.delta_text))
                    finish_reason = sample.finish_reason or finish_reason
            self._show(view, parser.finish())
            if finish_reason == "length":
                note = "[stopped at the token limit]"
        except KeyboardInterrupt:
            engine.abort(request_id)
            self._show(view, parser.finish())
            note = "[interrupted]"
        view.end(note)
        self.last_reasoning = view.reasoning or None
        assistant: dict[str, Any] = {"role": "assistant", "content": view.content}
        if view.reasoning:
            assistant["reasoning_content"] = view.reasoning
        self.messages = messages + [assistant]

    def _fitting(self, user_text: str, max_tokens: int | None) -> tuple[list[dict[str, Any]], str, list[int], int]:
        """(messages, prompt, its ids, how many old messages were dropped): the conversation with the new message,
        its oldest turns dropped (system messages kept) until the prompt leaves room for the reply, max_tokens or a
        quarter of the context. The new message alone may still not fit: the engine says so."""
        tokenizer = self.llm.tokenizer
        limit = getattr(self.llm.engine, "max_model_len", None)
        wanted = max_tokens if max_tokens is not None else (limit or 0) // 4
        system = [m for m in self.messages if m["role"] == "system"]
        turns = [m for m in self.messages if m["role"] != "system"]
        dropped = 0
        while True:
            messages = system + turns + [{"role": "user", "content": user_text}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   enable_thinking=self.enable_thinking)
            ids = tokenizer.encode(prompt)
            if limit is None or not turns or len(ids) + min(wanted, limit // 2) <= limit:
                return messages, prompt, ids, dropped
            cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns))  # a whole turn
            turns, dropped = turns[cut:], dropped + cut

    @staticmethod
    def _show(view: Any, delta: Any) -> None:
        view.reasoning_delta(delta.reasoning)
        view.content_delta(delta.content)


def read_messages(stream: TextIO, out: TextIO, interactive: bool) -> Iterator[str]:
    """User inputs, one per line; a line of three double quotes opens and closes a multi-line one."""
    def lines() -> Iterator[str]:
        while True:
            if interactive:
                try:
                    yield input(">>> ")
                except EOFError:
                    out.write("\n")
                    return
                except KeyboardInterrupt:
                    out.write("\n(use /exit or Ctrl-D to quit)\n")
                    continue
            else:
                line = stream.readline()
                if not line:
                    return
                line = line.rstrip("\r\n")
                if line.strip():
                    out.write(f">>> {line}\n")
                yield line

    source = lines()
    for line in source:
        if line.strip() == '"""':
            block = []
            for more in source:
                if more.strip() == '"""':
                    break
                block.append(more)
            line = "\n".join(block)
        if line.strip():
            yield line


def is_command(line: str) -> bool:
    # Exactly the word: "/no_think tell me a joke" is a message carrying Qwen3's soft switch.
    return line.strip() in COMMAND_WORDS


def run(args: argparse.Namespace) -> int:
    from qwenstack.commands._common import load_llm
    from qwenstack.errors import ConfigError

    out = sys.stdout
    interactive = sys.stdin.isatty()
    live = out.isatty()
    color = live and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    llm = load_llm(args)
    if llm.engine.labels is not None:  # said before the prompt opens, not at the first message
        raise ConfigError(f"{llm.loaded.name} is a sequence-classification model: it classifies texts "
                          f"(POST /classify, LLM.classify), it cannot chat")
    if llm.engine.embedding_only:
        raise ConfigError(f"{llm.loaded.name} is an embedding model: it computes embeddings, it cannot chat")
    if llm.tokenizer.chat_template is None:
        raise ConfigError(f"{llm.loaded.path} has no chat template; use `qwenstack generate` for plain text")
    session = ChatSession(llm, args, out, live=live, color=color)
    if interactive:
        mode = "on" if session.enable_thinking else "off"
        session.say(f"Chatting with {llm.loaded.name} (thinking {mode}). /help for commands, /exit or Ctrl-D to quit.")
    for line in read_messages(sys.stdin, out, interactive):
        if is_command(line):
            if not session.command(line):
                break
            continue
        if line.startswith("/") and " " not in line.strip():
            session.say(f"Unknown command '{line.strip()}'. /help lists the commands.")
            continue
        session.reply(line)
    return 0


COMMANDS = [Command("chat", "Chat with a model in the terminal (streaming, thinking folded)", add_arguments, run,
                    order=20, aliases=("run",))]  # `run`: what an Ollama user types first
