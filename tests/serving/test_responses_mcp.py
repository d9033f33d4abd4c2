"""Server-side MCP tools in /v1/responses: an MCP server made with the `mcp` package (two tools, get_time always
failing) on localhost over streamable HTTP; a scripted checkpoint that calls both tools and answers once it has
read their results. Also approvals, servers that are down or hang, stdio policy, and the OpenAI Agents SDK."""
from __future__ import annotations

import sys
import time
from typing import Iterator

import openai
import pytest

from responses_fixtures import AGENT_ANSWER, HangingServer, build_agent, build_looper, mcp_test_app
from server_utils import BackgroundServer, free_port, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

TIMEOUT_S = 2.0
MAX_STEPS = 3  # the server's mcp_max_steps here (8 by default)
STDIO_SERVER = '''
from mcp.server.mcpserver import MCPServer
server = MCPServer("local")

@server.tool()
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return city + ": foggy (stdio)"

server.run("stdio")
'''


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    with BackgroundServer(mcp_test_app()) as srv:
        yield srv.url + "/mcp"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mcp_url: str) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("mcp")
    agent, looper = build_agent(root / "agent"), build_looper(root / "looper")
    script = root / "stdio_server.py"
    script.write_text(STDIO_SERVER)
    config = ServerConfig(responses_db_path=str(root / "responses.db"), enable_ui=False, mcp_timeout_s=TIMEOUT_S,
                          mcp_servers={"station": mcp_url, "local": f"stdio:{sys.executable} {script}"},
                          mcp_allow_stdio=True, mcp_max_steps=MAX_STEPS)
    served = tiny_served_model(agent.path, "agent")
    app = create_app([served, tiny_served_model(looper.path, "looper")], config)
    with BackgroundServer(app) as srv:
        srv.served = served
        srv.app = app
        yield srv


@pytest.fixture
def turns(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every model turn the agent model runs during the test: its rendered prompt and sampling parameters."""
    engine = server.served.engine
    generate = engine.generate
    seen: list[dict] = []

    def recording(prompt_ids, params, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append({"prompt": kwargs.get("prompt"), "params": params})
        return generate(prompt_ids, params, **kwargs)

    monkeypatch.setattr(engine, "generate", recording)
    return seen


def mcp(url: str | None = None, approval: str = "never", label: str = "station") -> dict:
    tool = {"type": "mcp", "server_label": label, "require_approval": approval}
    return tool | ({"server_url": url} if url else {})


def test_one_request_runs_the_whole_tool_loop(client: openai.OpenAI, mcp_url: str) -> None:
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[mcp(mcp_url)])
    assert r.status == "completed"
    assert [i.type for i in r.output] == ["mcp_list_tools", "reasoning", "mcp_call", "mcp_call", "message"]
    listing, _, weather, clock, answer = r.output
    assert sorted(t.name for t in listing.tools) == ["get_time", "get_weather"] and listing.error is None
    assert weather.name == "get_weather" and weather.output == "Paris: sunny, 21 C" and weather.error is None
    assert clock.name == "get_time" and clock.output is None  # a failure the model reads, not a 500
    assert clock.error.type == "mcp_tool_execution_error" and "get_time" in clock.error.content[0]["text"]
    assert r.output_text == AGENT_ANSWER  # the model's second turn, after reading both results
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > len(AGENT_ANSWER.split())


def test_max_tool_calls(client: openai.OpenAI) -> None:
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[mcp()], max_tool_calls=1)
    weather, clock = [i for i in r.output if i.type == "mcp_call"]
    assert weather.output == "Paris: sunny, 21 C"
    assert clock.output is None and "max_tool_calls (1)" in clock.error.message
    assert r.output_text == AGENT_ANSWER and r.max_tool_calls == 1


def test_streamed_mcp_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model="agent", input="Weather and time in Paris?", tools=[mcp()]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert final.output_text == AGENT_ANSWER  # a pre-registered server: named by its label only
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.mcp_list_tools.in_progress"]
    assert kinds[4:6] == ["response.mcp_list_tools.completed", "response.output_item.done"]
    call = kinds.index("response.mcp_call_arguments.delta")
    assert kinds[call - 1:call + 5] == ["response.output_item.added", "response.mcp_call_arguments.delta",
                                        "response.mcp_call_arguments.done", "response.mcp_call.in_progress",
                                        "response.mcp_call.completed", "response.output_item.done"]
    assert "response.mcp_call.failed" in kinds and kinds[-1] == "response.completed"


def test_approval_pauses_and_resumes(client: openai.OpenAI) -> None:
    asked = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[mcp(approval="always")])
    assert [i.type for i in asked.output] == ["mcp_list_tools", "reasoning", "mcp_approval_request",
                                              "mcp_approval_request"]
    weather, clock = asked.output[2:]
    answers = [{"type": "mcp_approval_response", "approval_request_id": weather.id, "approve": True},
               {"type": "mcp_approval_response", "approval_request_id": clock.id, "approve": False}]
    done = client.responses.create(model="agent", previous_response_id=asked.id, input=answers,
                                   tools=[mcp(approval="always")])
    assert [i.type for i in done.output] == ["mcp_call", "mcp_call", "message"]  # listed once per conversation
    assert done.output[0].approval_request_id == weather.id and done.output[0].output == "Paris: sunny, 21 C"
    assert "denied" in done.output[1].error.content[0]["text"]
    assert done.output_text == AGENT_ANSWER


def test_failure_after_the_stream_started_is_an_error_event(client: openai.OpenAI, server: BackgroundServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenstack.errors import RequestError

    engine = server.served.engine
    generate = engine.generate
    turns: list[int] = []

    def second_turn_fails(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        turns.append(1)
        if len(turns) == 2:
            raise RequestError("the prompt is longer than the model's context (a stand-in)")
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", second_turn_fails)
    with client.responses.stream(model="agent", input="Weather and time in Paris?", tools=[mcp()]) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"] and "response.mcp_call.completed" in kinds
    assert "longer than the model's context" in events[-2].message
    failed = events[-1].response
    assert failed.status == "failed" and "longer than the model's context" in failed.error.message
    assert failed.error.code == "invalid_prompt"
    assert client.responses.retrieve(failed.id).status == "failed"  # stored as it ended


def test_headers_reach_the_mcp_server_and_are_never_echoed(client: openai.OpenAI) -> None:
    with BackgroundServer(mcp_test_app(token="s3cret")) as secured:
        url = secured.url + "/mcp"
        refused = client.responses.create(model="agent", input="Weather?", tools=[mcp(url, label="secured")])
        assert refused.output[0].type == "mcp_list_tools" and refused.output[0].error  # no token: refused
        tool = mcp(url, label="secured") | {"headers": {"Authorization": "Bearer s3cret"}}
        r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[tool])
    assert r.output[0].error is None and r.output_text == AGENT_ANSWER
    assert r.tools[0].headers is None and "s3cret" not in r.model_dump_json()
    assert "s3cret" not in client.responses.retrieve(r.id).model_dump_json()


@pytest.mark.parametrize("kind", ["down", "hangs"])
def test_unreachable_server_is_a_failed_listing(client: openai.OpenAI, kind: str) -> None:
    with HangingServer() as hanging:
        url = hanging.url if kind == "hangs" else f"http://127.0.0.1:{free_port()}/mcp"
        start = time.monotonic()
        r = client.responses.create(model="agent", input="Weather?", tools=[mcp(url, label="flaky")])
        elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + 10
    listing = r.output[0]
    assert listing.type == "mcp_list_tools" and listing.tools == [] and listing.error
    assert ("timed out" in listing.error) == (kind == "hangs")
    assert r.status == "completed" and r.output[-1].type == "message"  # the model still answers


def test_stdio_servers_only_when_the_operator_allows_them(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="stdio"):
        client.responses.create(model="agent", input="Hi", tools=[mcp("stdio:python -m evil")])
    with pytest.raises(ValueError, match="--mcp-allow-stdio"):
        create_app([], ServerConfig(enable_ui=False, responses_db_path=":memory:",
                                    mcp_servers={"local": "stdio:python server.py"}))
    # Registered by the operator, with --mcp-allow-stdio: the server starts it and lists its tool.
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[mcp(label="local")])
    assert r.output[0].error is None, r.output[0].error
    assert [t.name for t in r.output[0].tools] == ["get_weather"]
    assert r.output[2].type == "mcp_call" and r.output[2].output == "Paris: foggy (stdio)"


def test_background_response_cancelled_while_it_waits(client: openai.OpenAI) -> None:
    with HangingServer() as hanging:
        r = client.responses.create(model="agent", input="Weather?", background=True,
                                    tools=[mcp(hanging.url, label="slow")])
        assert r.status == "queued"
        cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(r.id).status == "cancelled"


def test_openai_agents_sdk_runs_a_two_tool_task(server: BackgroundServer) -> None:
    """The OpenAI Agents SDK, unmodified, with its own function tools: one run, two tool calls, one answer."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    called: list[tuple[str, str]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        called.append(("get_weather", city))
        return f"{city}: sunny, 21 C"

    @function_tool
    def get_time(city: str) -> str:
        """Local time in a city."""
        called.append(("get_time", city))
        return "14:05"

    model = OpenAIResponsesModel("agent", openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused"))
    agent = Agent(name="assistant", instructions="Use the tools.", tools=[get_weather, get_time], model=model)
    result = Runner.run_sync(agent, "Weather and time in Paris?")
    assert called == [("get_weather", "Paris"), ("get_time", "Paris, France")]
    assert result.final_output == AGENT_ANSWER


def test_serve_mcp_flags() -> None:
    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import serve_config_from_args, server_config

    def args(*argv: str):  # noqa: ANN202
        return build_parser(discover_commands()[0]).parse_args(["serve", *argv])

    values = serve_config_from_args(args("--mcp", "docs=http://127.0.0.1:9000/mcp", "--mcp", "fs=stdio:mcp-fs /srv",
                                         "--mcp-allow-stdio"))
    config = server_config(values)
    assert config.mcp_servers == {"docs": "http://127.0.0.1:9000/mcp", "fs": "stdio:mcp-fs /srv"}
    assert config.mcp_allow_stdio
    with pytest.raises(ValueError, match="--mcp-allow-stdio"):
        serve_config_from_args(args("--mcp", "fs=stdio:mcp-fs /srv"))
    with pytest.raises(ValueError, match="NAME=URL"):
        serve_config_from_args(args("--mcp", "nothing"))


def test_tool_results_reach_the_next_turns_prompt(client: openai.OpenAI, turns: list[dict]) -> None:
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[mcp()])
    assert r.output_text == AGENT_ANSWER and len(turns) == 2
    first, second = turns[0]["prompt"], turns[1]["prompt"]
    assert "<tool_response>" not in first and second.startswith(first)  # the same conversation, grown
    # What the model reads: each tool's result (or its error) in the template's tool-response block.
    assert "<tool_response>\nParis: sunny, 21 C\n</tool_response>" in second
    assert "\nError: Error executing tool get_time\n</tool_response>" in second  # the MCP SDK's error text


def test_step_limit_stops_a_model_that_keeps_calling_tools(client: openai.OpenAI) -> None:
    from qwenstack.serving.config import ServerConfig

    assert ServerConfig().mcp_max_steps == 8  # the default; this server runs with MAX_STEPS
    r = client.responses.create(model="looper", input="Weather in Oslo?", tools=[mcp()])
    calls = [i for i in r.output if i.type == "mcp_call"]
    assert len(calls) == MAX_STEPS + 1  # MAX_STEPS turns ran their calls; the next turn's call is shown, not run
    assert all(c.output == "Oslo: sunny, 21 C" for c in calls[:-1])
    assert calls[-1].output is None and "limit of 3 model turns" in calls[-1].error.message
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_steps"
    assert not any(i.type == "message" for i in r.output)  # no tool-call markup leaked as an answer
    with client.responses.stream(model="looper", input="Weather in Oslo?", tools=[mcp()]) as stream:
        kinds = [e.type for e in stream]
    assert kinds[-1] == "response.incomplete" and kinds.count("response.mcp_call.failed") == 1


def test_a_tool_call_that_hangs_is_an_error_result_within_the_timeout(client: openai.OpenAI) -> None:
    with BackgroundServer(mcp_test_app(weather_hangs_s=TIMEOUT_S + 3)) as slow:
        start = time.monotonic()
        r = client.responses.create(model="agent", input="Weather and time in Paris?",
                                    tools=[mcp(slow.url + "/mcp", label="slow")])
        elapsed = time.monotonic() - start
    assert elapsed < 2 * TIMEOUT_S + 3
    assert r.output[0].error is None  # listing worked: only the call hangs
    weather = next(i for i in r.output if i.type == "mcp_call" and i.name == "get_weather")
    assert weather.status == "failed" and weather.output is None and "timed out after 2 s" in weather.error.message
    assert r.status == "completed" and r.output_text == AGENT_ANSWER  # the model read the error and answered


def test_allowed_tools_filters_what_is_listed_offered_and_run(client: openai.OpenAI, turns: list[dict]) -> None:
    tool = mcp() | {"allowed_tools": {"tool_names": ["get_weather"]}}
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[tool])
    assert [t.name for t in r.output[0].tools] == ["get_weather"]
    assert '"name": "get_weather"' in turns[0]["prompt"] and '"name": "get_time"' not in turns[0]["prompt"]
    # The model still asks for get_time: not an MCP tool of this request, so it is not run on the MCP server
    # but handed to the client as a function call (as a call of any tool the client did not declare).
    assert [(i.type, i.name) for i in r.output if i.type in ("mcp_call", "function_call")] == \
        [("mcp_call", "get_weather"), ("function_call", "get_time")]
    assert r.tools[0].allowed_tools.tool_names == ["get_weather"]


def test_tool_choice_allowed_tools_offers_only_the_listed_mcp_tool(client: openai.OpenAI, turns: list[dict]) -> None:
    """tool_choice allowed_tools (the AI SDK's allowedTools option) narrows what the model is offered as the MCP
    tool's own allowed_tools does; the listing still names both tools."""
    choice = {"type": "allowed_tools", "mode": "auto",
              "tools": [{"type": "mcp", "server_label": "station", "name": "get_weather"}]}
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[mcp()], tool_choice=choice)
    assert [t.name for t in r.output[0].tools] == ["get_weather", "get_time"]
    assert '"name": "get_weather"' in turns[0]["prompt"] and '"name": "get_time"' not in turns[0]["prompt"]
    assert [(i.type, i.name) for i in r.output if i.type in ("mcp_call", "function_call")] == \
        [("mcp_call", "get_weather"), ("function_call", "get_time")]

@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_tool_choice_binds_the_first_turn_only(client: openai.OpenAI, turns: list[dict], choice) -> None:
    # Seeded: where the grammar masks the scripted model's token, it meets ties (e.g. ' ' / ' "' /
    # ' "get_weather",' after '":') and the call's tokens are a draw; seeds 0-7 gave the scripted call in 15
    # of 16 draws. Unseeded, the draw depended on every request the module's other tests made before.
    r = client.responses.create(model="agent", input="Weather and time in Paris?", tools=[mcp()],
                                tool_choice=choice, parallel_tool_calls=False, extra_body={"seed": 0})
    assert [i.type for i in r.output] == ["mcp_list_tools", "reasoning", "mcp_call", "message"]
    assert r.output[2].name == "get_weather" and r.output_text == AGENT_ANSWER
    first, second = (t["params"].logits_processors for t in turns)
    assert len(first) == 1 and second == []  # a tool-call grammar on the first turn, none on the answer


def test_delete_while_a_background_response_runs(client: openai.OpenAI, server: BackgroundServer) -> None:
    running = server.app.state.qwenstack_responses.running
    with HangingServer() as hanging:
        r = client.responses.create(model="agent", input="Weather?", background=True,
                                    tools=[mcp(hanging.url, label="slow")])
        assert r.id in running
        deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    assert r.id not in running  # its task was cancelled, not left waiting on the MCP server
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
