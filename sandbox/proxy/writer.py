"""A PolicyWriter for the standalone process: appends the approved endpoint to the policy file.

The control plane, which owns policy revisions, can pass its own writer instead (embedding), or
read `persisted: true` from the admin API and record the revision itself."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sandbox.policy import Endpoint, load_policy


class FilePolicyWriter:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def persist_allow(self, sandbox: str, endpoint: Endpoint) -> None:
        policy = load_policy(self.path)
        if endpoint in policy.network.allow:
            return
        network = policy.network.model_copy(update={"allow": [*policy.network.allow, endpoint]})
        text = policy.with_network(network).to_yaml()
        # Atomic replace: a reader (or SIGHUP reload) never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, self.path.stat().st_mode & 0o777)
        os.replace(tmp, self.path)
