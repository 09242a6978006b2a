"""A generic agent: the blueprint's `command` is the sandbox's main process. It takes turns one
of two ways, or none:

- `turn: [argv]`: that argv runs once per turn with the message and session in its environment
  ($AGENT_MESSAGE, $AGENT_SESSION); its stdout is the reply.
- `serve: {port: N}`: the command stays up (the supervisor restarts it) and serves its turns on
  the sandbox's loopback port N, speaking the /v1/responses subset of responses.py with its
  token in $AGENT_TOKEN and the session in the `x-agent-session` header
  (tests/fixtures/responses_server.py is one, in standard-library Python).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from blueprints.model import Blueprint
from blueprints.runtimes import WORKSPACE, Exec, Finished, Reply, Service, Serving, TurnEvent
from blueprints.runtimes.responses import READY_TIMEOUT_S, bad_session, stream_turn, wait_ready
from sandbox.policy import Policy

MESSAGE_ENV = "AGENT_MESSAGE"
SESSION_ENV = "AGENT_SESSION"
TOKEN_ENV = "AGENT_TOKEN"
SESSION_HEADER = "x-agent-session"
MODEL = "agent"


class CommandRuntime:
    workspace = WORKSPACE
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint

    def policy(self) -> Policy:
        """The blueprint's policy; a served command may also listen on its port."""
        policy = self.blueprint.policy()
        serve = self.blueprint.runtime.serve
        if serve is None:
            return policy
        listen = sorted({*policy.process.listen, serve.port})
        return policy.model_copy(
            update={"process": policy.process.model_copy(update={"listen": listen})}
        )

    def command(self) -> list[str]:
        assert self.blueprint.runtime.command is not None  # the model requires it
        return list(self.blueprint.runtime.command)

    def service(self) -> Service | None:
        serve = self.blueprint.runtime.serve
        return None if serve is None else Service(port=serve.port, token_env=TOKEN_ENV)

    def agent_files(self, serving: Serving) -> None:
        return None

    def turn(self, message: str, session: str) -> Exec | None:
        argv = self.blueprint.runtime.turn
        if argv is None:
            return None
        env = {MESSAGE_ENV: message, SESSION_ENV: session}
        return Exec(list(argv), env, self.blueprint.inference.timeout_s)

    def read_turn(self, exit_code: int, stdout: bytes, stderr: bytes) -> Reply:
        text = stdout.decode(errors="replace").rstrip("\n")
        return Reply(ok=exit_code == 0, text=text)

    def drive(
        self, http: httpx.Client, token: str, message: str, session: str
    ) -> Iterator[TurnEvent]:
        service = self.service()
        if service is None:
            error: str | None = "this command serves no turns (it has no `runtime.serve`)"
        else:
            error = bad_session(session) or wait_ready(
                http, service.ready_path, self.ready_timeout_s
            )
        if error is not None:
            yield Finished(ok=False, text="", error=error)
            return
        body = {"model": MODEL, "input": message, "stream": True}
        result = yield from stream_turn(http, token, body, {SESSION_HEADER: session})
        yield result.finished(session)
