"""A small, real OpenID Connect provider for tests: an HTTP server on 127.0.0.1 in a thread.

It signs ID tokens with an RS256 key made at start and publishes the public half at /jwks. Its
/authorize approves at once whoever the test configured (``provider.claims``) and sends the
browser back with a code and the state; /token swaps the code (with the client id and secret) for
an ID token and an access token; /userinfo answers the access token with the claims.

    provider.claims = {"sub": "u1", "cloudiopsy_role": "pathologist", ...}   # /userinfo
    provider.id_token_claims = {"amr": ["pwd", "mfa"]}   # added to (or replacing) the ID token's
    provider.id_token_mutator = lambda token: ...        # e.g. tamper with the signed token
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


def _b64url_uint(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class LocalOIDCProvider:
    def __init__(self, *, client_id: str = "cloudiopsy-test", client_secret: str | None = None):
        self.client_id = client_id
        self.client_secret = client_secret or secrets.token_urlsafe(24)
        self.key = new_rsa_key()
        self.kid = f"test-{secrets.token_hex(4)}"
        self.claims: dict = {}
        self.id_token_claims: dict = {}
        # When set, ID tokens are signed with this key (under our kid): a forgery.
        self.signing_key: rsa.RSAPrivateKey | None = None
        self.id_token_mutator: Callable[[str], str] | None = None
        self.token_requests: list[dict] = []
        self._codes: dict[str, dict] = {}
        self._access_tokens: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LocalOIDCProvider:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="oidc-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def django_settings(self) -> dict:
        """The OIDC_* settings that point Cloudiopsy at this provider."""
        return {
            "OIDC_RP_CLIENT_ID": self.client_id,
            "OIDC_RP_CLIENT_SECRET": self.client_secret,
            "OIDC_RP_SIGN_ALGO": "RS256",
            "OIDC_OP_AUTHORIZATION_ENDPOINT": self.url("/authorize"),
            "OIDC_OP_TOKEN_ENDPOINT": self.url("/token"),
            "OIDC_OP_USER_ENDPOINT": self.url("/userinfo"),
            "OIDC_OP_JWKS_ENDPOINT": self.url("/jwks"),
            "OIDC_OP_LOGOUT_ENDPOINT": self.url("/logout"),
        }

    # -- the protocol ----------------------------------------------------------------------------
    def jwks(self) -> dict:
        numbers = self.key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "alg": "RS256",
                    "kid": self.kid,
                    "n": _b64url_uint(numbers.n),
                    "e": _b64url_uint(numbers.e),
                }
            ]
        }

    def authorize(self, query: dict[str, str]) -> tuple[int, dict, str]:
        if query.get("client_id") != self.client_id or query.get("response_type") != "code":
            return HTTPStatus.BAD_REQUEST, {}, "unknown client or response type"
        redirect_uri = query.get("redirect_uri", "")
        if not redirect_uri:
            return HTTPStatus.BAD_REQUEST, {}, "no redirect_uri"
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = {
                "redirect_uri": redirect_uri,
                "nonce": query.get("nonce"),
                "claims": dict(self.claims),
                "expires": time.time() + 60,
            }
        answer = urlencode({"code": code, "state": query.get("state", "")})
        location = f"{redirect_uri}{'&' if '?' in redirect_uri else '?'}{answer}"
        return HTTPStatus.FOUND, {"Location": location}, ""

    def token(self, form: dict[str, str], authorization: str) -> tuple[int, dict]:
        self.token_requests.append(dict(form))
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if authorization.startswith("Basic "):
            client_id, _, client_secret = base64.b64decode(authorization[6:]).decode().partition(":")
        if client_id != self.client_id or not secrets.compare_digest(client_secret or "", self.client_secret):
            return HTTPStatus.UNAUTHORIZED, {"error": "invalid_client"}
        with self._lock:
            grant = self._codes.pop(form.get("code", ""), None)  # single use
        if (
            form.get("grant_type") != "authorization_code"
            or grant is None
            or grant["expires"] < time.time()
            or grant["redirect_uri"] != form.get("redirect_uri")
        ):
            return HTTPStatus.BAD_REQUEST, {"error": "invalid_grant"}
        access_token = secrets.token_urlsafe(24)
        with self._lock:
            self._access_tokens[access_token] = grant["claims"]
        now = int(time.time())
        id_claims = {
            "iss": self.base_url,
            "sub": grant["claims"].get("sub"),
            "aud": self.client_id,
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
            **({"nonce": grant["nonce"]} if grant["nonce"] else {}),
            **self.id_token_claims,
        }
        id_token = jwt.encode(id_claims, self.signing_key or self.key, algorithm="RS256", headers={"kid": self.kid})
        if self.id_token_mutator is not None:
            id_token = self.id_token_mutator(id_token)
        return HTTPStatus.OK, {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
        }

    def userinfo(self, authorization: str) -> tuple[int, dict]:
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        with self._lock:
            claims = self._access_tokens.get(token)
        if claims is None:
            return HTTPStatus.UNAUTHORIZED, {"error": "invalid_token"}
        return HTTPStatus.OK, claims


def _handler_for(provider: LocalOIDCProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # quiet in test output
            pass

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            if url.path == "/authorize":
                status, headers, text = provider.authorize(query)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                body = text.encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif url.path == "/jwks":
                self._json(HTTPStatus.OK, provider.jwks())
            elif url.path == "/userinfo":
                self._json(*provider.userinfo(self.headers.get("Authorization", "")))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not_found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            form = {key: values[0] for key, values in parse_qs(self.rfile.read(length).decode()).items()}
            if urlsplit(self.path).path == "/token":
                self._json(*provider.token(form, self.headers.get("Authorization", "")))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not_found"})

    return Handler
