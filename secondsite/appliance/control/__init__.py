"""The appliance's control API: an HTTPS server on the appliance's event loop, `/metrics`,
`/healthz`, and the typed async client the operator uses.

- `server`: routes, authentication, error answers (the route table is in its docstring).
- `client`: :class:`ControlClient` and its exception tree.
- `models`: request and response bodies, shared by both.
- `query`, `errors`, `auth`, `metrics`: checkpoint queries, error mapping, token and TLS,
  Prometheus series.
"""

from .client import (
    ConflictError,
    ControlClient,
    ControlError,
    ErrorResponse,
    InvalidRequestError,
    NotFoundError,
    ServerError,
    TransportError,
    UnauthorizedError,
    UnsupportedError,
)

__all__ = [
    "ConflictError",
    "ControlClient",
    "ControlError",
    "ErrorResponse",
    "InvalidRequestError",
    "NotFoundError",
    "ServerError",
    "TransportError",
    "UnauthorizedError",
    "UnsupportedError",
]
