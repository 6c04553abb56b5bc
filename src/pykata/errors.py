"""The errors pykata reports to its users.

Every error a person can see says what was wrong and, through `hint`, how to fix
it. Library code raises these; the command line and the shim only format them.
"""

from __future__ import annotations


class PykataError(Exception):
    """Base of every user-facing pykata error."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}: {self.hint}"
        return self.message


class ConfigError(PykataError):
    """The configuration file or an annotation is invalid."""


class AssetsError(PykataError):
    """Guest assets are missing, stale or could not be built."""


class HostError(PykataError):
    """The host lacks something pykata needs (a tool, a device, privileges)."""


class NetworkError(PykataError):
    """A pod's network namespace cannot be mirrored into its VM."""


class SpecError(PykataError):
    """An OCI bundle or its config.json is invalid."""


class HypervisorError(PykataError):
    """The VM could not be started or controlled."""


class AgentError(PykataError):
    """The agent in the guest did not answer or refused a request.

    `code` is the ttRPC status code (a google.rpc.Code number) when the agent
    answered with one, so front ends can map it onto their own error kinds.
    """

    def __init__(self, message: str, *, hint: str | None = None, code: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class ContainerError(PykataError):
    """A container operation failed."""


class NotFoundError(PykataError):
    """A sandbox, container or process does not exist."""


class InvalidStateError(PykataError):
    """An operation asked of a sandbox, container or process in a state that
    does not allow it ("container web is running")."""


class AlreadyExistsError(PykataError):
    """A sandbox, container or process of that id exists already."""
