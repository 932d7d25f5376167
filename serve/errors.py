"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 414: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error", 503: "service_unavailable"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """A JSON request body as `model`; a 400 naming the first bad field otherwise (an unknown one: not supported)."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        path = ".".join(str(x) for x in err["loc"])  # union branches show as e.g. 'constrained-int'
        head = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise bad_request(f"'{path}' is not supported by this server", head) from None
        raise bad_request(f"'{path}': {err['msg']}", head) from None
