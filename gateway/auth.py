"""Bearer tokens per API (``gateway.auth``): the check a call of an API passes before it runs.

:meth:`Authorizer.guard` gives the check of one API by its name (``predict``, ``invoke``,
``async``, ``jobs``), or None when the API is open, so an open API costs nothing per call; the edge
runs it before the RPC's handler (``edge(..., guard=...)``), and a service outside the edge calls
:meth:`Authorizer.check`. A call without ``authorization`` metadata, or with one that is not
``Bearer <token>``, gets UNAUTHENTICATED; a token that is none of the API's gets
PERMISSION_DENIED. Tokens are compared with ``hmac.compare_digest`` against every token of the API
(no early exit), and neither a token sent nor one configured is ever logged or put in a status.

A handler's own calls to the gateway (``tensorflow_client``) carry the gateway's per-start handler
secret instead (gateway/handlers/clients.py): they belong to an Invoke that passed its own check.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import Any

import grpc

from gateway.errors import PermissionDenied, Unauthenticated
from modelmux_common.config.schema import AuthSpec, TokenSpec
from modelmux_common.security import read_tokens

Context = grpc.aio.ServicerContext[Any, Any]
Guard = Callable[[Context], None]
# the APIs gateway.auth names, by the key of their section
APIS = ("predict", "invoke", "async", "jobs")
# A handler's own calls carry HANDLER_CALL_KEY: the secret its worker got in HANDLER_SECRET_ENV
HANDLER_CALL_KEY = "x-modelmux-handler-call"
HANDLER_SECRET_ENV = "MODELMUX_HANDLER_SECRET"
_BEARER = re.compile(r"^[Bb]earer +([A-Za-z0-9\-._~+/]+=*) *\Z")


def _specs(auth: AuthSpec) -> dict[str, TokenSpec | None]:
    return {"predict": auth.predict, "invoke": auth.invoke, "async": auth.async_, "jobs": auth.jobs}


class Authorizer:
    """The tokens of every API that has some, read once at start (the config's rules checked
    them). ``from_handler(context)`` tells a handler's own call (see the module's docstring)."""

    def __init__(
        self, auth: AuthSpec, *, from_handler: Callable[[Context], bool] = lambda _: False
    ) -> None:
        self._tokens = {
            api: read_tokens(spec) for api, spec in _specs(auth).items() if spec is not None
        }
        self._from_handler = from_handler

    def protects(self, api: str) -> bool:
        return api in self._tokens

    def guard(self, api: str) -> Guard | None:
        """The check of ``api``'s calls; None when it has no tokens."""
        if api not in APIS:
            raise ValueError(f"unknown API {api!r} (known: {', '.join(APIS)})")
        tokens = self._tokens.get(api)
        if tokens is None:
            return None

        def check(context: Context) -> None:
            self._check(api, tokens, context)

        return check

    def check(self, api: str, context: Context) -> None:
        """Raises Unauthenticated or PermissionDenied unless the call may use ``api``."""
        guard = self.guard(api)
        if guard is not None:
            guard(context)

    def _check(self, api: str, tokens: tuple[bytes, ...], context: Context) -> None:
        sent = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                sent = value if isinstance(value, str) else ""
                break
        if not sent:
            if self._from_handler(context):
                return
            raise Unauthenticated(
                f"calls of the {api} API need metadata 'authorization: Bearer <token>'"
            )
        match = _BEARER.match(sent)
        if match is None:
            raise Unauthenticated("the authorization metadata is not 'Bearer <token>'")
        given = match.group(1).encode()
        matched = False
        for token in tokens:  # every one, so the time does not tell which came close
            matched |= hmac.compare_digest(given, token)
        if not matched:
            raise PermissionDenied(f"the token is not one of gateway.auth.{api}'s tokens")
