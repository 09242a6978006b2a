"""A generic agent: the blueprint's `command` is the sandbox's main process; a turn, when the
blueprint names one (`runtime.turn`), runs that argv with the message and session in its
environment and takes its stdout as the reply."""

from __future__ import annotations

from blueprints.model import Blueprint
from blueprints.runtimes import WORKSPACE, Exec, Reply, Serving
from sandbox.policy import Policy

MESSAGE_ENV = "AGENT_MESSAGE"
SESSION_ENV = "AGENT_SESSION"


class CommandRuntime:
    workspace = WORKSPACE

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint

    def policy(self) -> Policy:
        return self.blueprint.policy()

    def command(self) -> list[str]:
        assert self.blueprint.runtime.command is not None  # the model requires it
        return list(self.blueprint.runtime.command)

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

    def export_session(self, session: str) -> None:
        return None  # a plain command keeps no sessions the appliance knows how to read
