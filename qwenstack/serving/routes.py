"""The app's routes as one flat list, whatever FastAPI version built it (newer versions keep included
routers as nested objects; older ones copy their routes into the app). Used by the body rules, the 405
Allow header and the OpenAPI document, so each sees routes added later by any router."""
from __future__ import annotations

from typing import Any, Iterator

from starlette.routing import Match
from starlette.types import Scope


def route_contexts(routes: Any) -> Iterator[Any]:
    """Each route with its full path: `path_format`, `methods`, `endpoint`, `matches(scope)` and, for API
    routes, `body_field` and `openapi_extra`."""
    from fastapi import routing

    iterate = getattr(routing, "iter_route_contexts", None)
    yield from iterate(routes) if iterate is not None else routes


def matching_route(routes: Any, scope: Scope) -> Any:
    """The route that will handle this request, or None (a 404 or 405)."""
    for route in route_contexts(routes):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
    return None


def allowed_methods(routes: Any, scope: Scope) -> list[str]:
    """Every method some route accepts on this request's path (a 405's Allow header)."""
    methods: set[str] = set()
    for route in route_contexts(routes):
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches({**scope, "method": next(iter(route_methods))})[0] is Match.FULL:
            methods |= set(route_methods)
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: order.index(m) if m in order else len(order))
