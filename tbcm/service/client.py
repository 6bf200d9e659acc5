"""The operator's client of a running service: the live model's identity (GET /info) and a hot swap
(POST /admin/swap with the admin token), as `tbcm swap` and `tbcm deploy` send them."""
from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from tbcm.service.config import ADMIN_TOKEN_ENV


class ServiceError(ValueError):
    """The service could not be reached, or answered something other than what was asked for."""


def admin_token() -> str:
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ValueError(f"set {ADMIN_TOKEN_ENV} to the service's admin token")
    return token


def error_message(response: httpx.Response) -> str:
    """The message of one of our JSON errors ({"error": {"message": ...}}), else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


@dataclass
class ServiceClient:
    url: str                            # base URL, e.g. http://127.0.0.1:3000
    http: httpx.Client | None = None    # the connection (tests pass an in-process one); None: a new httpx.Client

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self.http = self.http or httpx.Client()

    def live(self, timeout: float = 30.0) -> dict:
        """The live model as /info describes it: spec, path (as the server sees it), manifest, manifest_sha256."""
        try:
            response = self.http.get(self.url + "/info", timeout=timeout)
        except httpx.HTTPError as err:
            raise ServiceError(f"{self.url}/info: cannot be reached: {err}") from None
        if response.status_code != 200:
            raise ServiceError(f"{self.url}/info answered {response.status_code}: {error_message(response)}")
        model = response.json().get("model")
        if not model:
            raise ServiceError(f"{self.url} has no live model yet (still loading): retry when /readyz is 200")
        return model

    def swap(self, model: str, token: str, timeout: float = 600.0) -> httpx.Response:
        """POST /admin/swap {"model": model}: blocks until the model is live (200) or refused (4xx)."""
        try:
            return self.http.post(self.url + "/admin/swap", json={"model": model},
                                  headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        except httpx.HTTPError as err:
            raise ServiceError(f"{self.url}/admin/swap: no answer: {err}") from None
