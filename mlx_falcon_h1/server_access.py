"""Who may call the server (server.py): pages on this machine and clients that send
no Origin, requests addressed to this machine, by default.

mlx-lm's server defaults to `--allowed-origins *`: any web page the user opens
may call the local server from the browser and read its answers (and the
conversations its prompt cache keeps). Ollama, after a DNS-rebinding advisory
(CVE-2024-28224), allows only local origins by default and checks the Host
header; so does this. mlx-lm's flag widens it (`*`: everyone, as in mlx-lm), and
a server bound to every address (`--host 0.0.0.0`) answers any Host.
"""

import ipaddress
from typing import List, Optional
from urllib.parse import urlsplit


def refusal(headers, args) -> Optional[str]:
    """Why a request with these headers is not served (the 403's message), or None.
    args: the server's parsed flags (allowed_origins, host)."""
    listed = _listed_origins(args.allowed_origins)
    if "*" in listed:
        return None
    host, origin = headers.get("Host"), headers.get("Origin")
    if host is not None and not _host_allowed(host, args.host):
        names = ["localhost", "127.0.0.1", "[::1]"]
        names += [args.host] if args.host.strip("[]").lower() not in _LOCAL_HOSTS else []
        return (
            f"requests addressed to host {host!r} are refused (a guard against DNS "
            f"rebinding): this server is bound to {args.host} and answers only requests "
            f"addressed to {', '.join(names)}. To reach it from other machines, start it "
            "with --host 0.0.0.0 (every address; then any Host is answered) or --host "
            "with this machine's address; web pages there also need their origin in "
            "--allowed-origins")
    if origin is not None and not _origin_allowed(origin, listed):
        return (
            f"requests from web pages at {origin} are refused: this server answers only "
            "pages on this machine (http(s)://localhost, 127.0.0.1 or [::1], any port)"
            + (f", {', '.join(listed)}" if listed else "")
            + " and clients that send no Origin. To let this page call it, start the "
            f"server with --allowed-origins {origin} (a comma-separated list; * lets every "
            "web page call it)")
    return None


def allowed_origin(origin: Optional[str], args) -> Optional[str]:
    """The Access-Control-Allow-Origin to send: "*", the request's origin if allowed, or None."""
    listed = _listed_origins(args.allowed_origins)
    if "*" in listed:
        return "*"
    return origin if origin is not None and _origin_allowed(origin, listed) else None


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # as urlsplit gives them: no brackets


def _hostname(authority: str) -> Optional[str]:
    """The lower-case host of a Host header ("[::1]:8080" -> "::1"), None if unreadable."""
    try:
        return urlsplit("//" + authority.strip()).hostname
    except ValueError:  # "[::1" and the like
        return None


def _is_local_origin(origin: str) -> bool:
    """Whether a browser's Origin is a page on this machine: http(s) on
    localhost, 127.0.0.1 or [::1], any port ("http://localhost.evil.com" is not)."""
    try:
        parts = urlsplit(origin)
        parts.port  # raises on a port that is not one
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and parts.hostname in _LOCAL_HOSTS
            and not parts.username and parts.path in ("", "/"))


def _listed_origins(allowed_origins) -> List[str]:
    """--allowed-origins as mlx-lm parsed it (a list; "*" before parsing), without
    the empty entry that default_to_local_origins puts there when the flag is not given."""
    if isinstance(allowed_origins, str):
        allowed_origins = allowed_origins.split(",")
    return [o.strip().rstrip("/") for o in allowed_origins or () if o.strip()]


def _origin_allowed(origin: str, listed: List[str]) -> bool:
    return "*" in listed or _is_local_origin(origin) or origin.rstrip("/") in listed


def _binds_every_address(host: str) -> bool:
    """--host 0.0.0.0 or ::: the user serves the network on purpose."""
    try:
        return host == "" or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:  # a name, e.g. --host mymac.local
        return False


def _host_allowed(host: str, bound: str) -> bool:
    """Whether a Host header names this server: localhost, 127.0.0.1, [::1] or the
    --host it is bound to, any port; any Host where it is bound to every address.
    A DNS-rebound page sends its own name (evil.example:8080) here."""
    if _binds_every_address(bound):
        return True
    return _hostname(host) in (*_LOCAL_HOSTS, bound.strip("[]").lower())


def default_to_local_origins(argv) -> None:
    """mlx-lm's --allowed-origins defaults to *: any web page the user opens may
    call the server and read its answers. Without the flag, argv gets an empty
    list before mlx-lm parses it, leaving only the local origins that
    FalconAPIHandler always allows. A flag the user gave, even abbreviated as
    argparse allows (--allowed-o), is left as it is."""
    for arg in argv[1:]:
        flag = arg.partition("=")[0]
        if len(flag) > len("--a") and "--allowed-origins".startswith(flag):
            return
    argv.append("--allowed-origins=")


