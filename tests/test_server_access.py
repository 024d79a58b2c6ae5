"""`python -m mlx_falcon_h1.server`: who may call it. Web pages on this machine and
clients that send no Origin are served; a page from elsewhere (a foreign Origin)
and, against DNS rebinding, a request addressed to a foreign Host get a 403 naming
what to pass, before anything runs. `--allowed-origins` widens it as in mlx-lm, and
`--host 0.0.0.0` answers any Host. The servers run the shipped model, which only
the requests that are served load."""

import json
import urllib.error
import urllib.request

import pytest

from conftest import running_server

from mlx_falcon_h1.server_access import default_to_local_origins

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0.0}
FOREIGN = "https://evil.example"


def call(port, method, path, origin=None, host=None, body=None):
    """(status, headers, JSON body or None); the connection goes to 127.0.0.1 whatever
    Host says, as it does for a page whose name was rebound to it."""
    headers = {"Content-Type": "application/json"}
    if origin is not None:
        headers["Origin"] = origin
    if host is not None:
        headers["Host"] = host
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    return status, headers, json.loads(raw) if raw else None


REQUESTS = [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None),
            ("OPTIONS", "/v1/chat/completions", None)]  # OPTIONS: a browser's preflight


@pytest.fixture(scope="module")
def default_port():
    with running_server() as port:
        yield port


@pytest.mark.parametrize("method,path,body", REQUESTS, ids=["post", "get", "preflight"])
def test_a_foreign_origin_is_refused(default_port, method, path, body):
    status, headers, answer = call(default_port, method, path, origin=FOREIGN, body=body)
    assert status == 403, (status, answer)
    assert FOREIGN in answer["error"] and "--allowed-origins" in answer["error"], answer
    assert "Access-Control-Allow-Origin" not in headers


def test_a_refused_post_body_is_read_not_left(default_port):
    """A long chat's body refused unread resets the connection: the client gets a
    broken pipe instead of the 403 (here from about 1 MB)."""
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 4_000_000}]})
    status, _, answer = call(default_port, "POST", "/v1/chat/completions", origin=FOREIGN,
                             body=body.encode())
    assert status == 403 and FOREIGN in answer["error"]


@pytest.mark.parametrize("origin", [None, "http://localhost:3000", "http://127.0.0.1:5173",
                                    "https://[::1]"])
def test_local_pages_and_clients_without_an_origin_are_served(default_port, origin):
    status, headers, answer = call(default_port, "POST", "/v1/chat/completions", origin=origin,
                                   body=CHAT)
    assert status == 200 and answer["choices"], answer
    assert headers.get("Access-Control-Allow-Origin") == origin  # echoed, never "*"
    status, headers, _ = call(default_port, "OPTIONS", "/v1/chat/completions", origin=origin)
    assert status == 204 and headers.get("Access-Control-Allow-Origin") == origin


def test_a_foreign_host_is_refused(default_port):
    """A DNS-rebound page's GET is same-origin: no Origin, only its own name as Host."""
    host = f"evil.example:{default_port}"
    status, _, answer = call(default_port, "GET", "/v1/models", host=host)
    assert status == 403 and host in answer["error"] and "--host 0.0.0.0" in answer["error"]
    for local in (f"localhost:{default_port}", f"[::1]:{default_port}", "127.0.0.1"):
        assert call(default_port, "GET", "/v1/models", host=local)[0] == 200, local


def test_allowed_origins_lists_more_pages():
    app = "http://app.example:3000"
    with running_server("--allowed-origins", f"{app},https://other.example") as port:
        status, headers, _ = call(port, "POST", "/v1/chat/completions", origin=app, body=CHAT)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == app
        assert call(port, "GET", "/v1/models", origin="http://localhost:8000")[0] == 200
        status, _, answer = call(port, "GET", "/v1/models", origin=FOREIGN)
        assert status == 403 and app in answer["error"]  # says what is allowed now


def test_allowed_origins_star_lets_every_page_and_host_in():
    with running_server("--allowed-origins", "*") as port:
        status, headers, _ = call(port, "GET", "/v1/models", origin=FOREIGN,
                                  host=f"evil.example:{port}")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"


def test_binding_every_address_answers_any_host():
    """--host 0.0.0.0 serves other machines, which address it by their own name for
    it; pages there still need --allowed-origins."""
    with running_server("--host", "0.0.0.0") as port:
        assert call(port, "GET", "/v1/models", host=f"192.168.1.20:{port}")[0] == 200
        assert call(port, "GET", "/v1/models", host=f"studio.lan:{port}")[0] == 200
        assert call(port, "GET", "/v1/models", origin="http://192.168.1.30:3000")[0] == 403


@pytest.mark.parametrize("flags", [
    ["--allowed-origins", "*"],
    ["--allowed-origins=http://a.example"],
    ["--allowed-o", "*"],  # argparse takes an unambiguous abbreviation
])
def test_the_default_is_set_only_where_the_flag_is_not_given(flags):
    argv = ["server", "--port", "8080"]
    default_to_local_origins(argv)
    assert argv == ["server", "--port", "8080", "--allowed-origins="]
    argv = ["server", *flags]
    default_to_local_origins(argv)
    assert argv == ["server", *flags]
