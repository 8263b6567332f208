"""Where Redis is: one server, a Sentinel-watched primary, or a Redis Cluster.

    redis://[user:pass@]host:port[/db]   rediss://…   unix:///path/to/socket
    redis+cluster://[user:pass@]host:port[,host:port…][?tls=1]   (rediss+cluster:// for TLS)
    redis+sentinel://[user:pass@]host:port[,host:port…]/MASTER-NAME[/DB]
                                                          (rediss+sentinel:// for TLS)

The credentials are those of the data nodes (the cluster's nodes, the primary
and its replicas). Sentinels are asked without credentials unless the query
holds `sentinel_password=…` (and `sentinel_username=…`).

`redacted()` is what logs, errors and the policy document may show: never a
password.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

import attrs

Kind = Literal["single", "cluster", "sentinel"]
SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

Node = tuple[str, int]


@attrs.frozen
class RedisAddress:
    """A parsed `--redis-url`. For `single`, `url` is the URL to connect to; for a
    cluster, `nodes` are seeds; for Sentinel, `nodes` are the Sentinels."""

    kind: Kind
    url: str = attrs.field(repr=False)  # may hold a password
    nodes: tuple[Node, ...] = ()
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False
    master_name: str | None = None
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = attrs.field(default=None, repr=False)

    def node_url(self, node: Node) -> str:
        """The `redis://` (or `rediss://`) URL of one data node, with the credentials."""
        host, port = node
        scheme = "rediss" if self.tls else "redis"
        login = ""
        if self.password is not None:
            user = quote(self.username or "", safe="")
            login = f"{user}:{quote(self.password, safe='')}@"
        elif self.username:
            login = f"{quote(self.username, safe='')}@"
        netloc = f"[{host}]" if ":" in host else host
        db = f"/{self.db}" if self.db else ""
        return f"{scheme}://{login}{netloc}:{port}{db}"

    def sentinel_url(self, node: Node) -> str:
        """The URL of one Sentinel, with the Sentinels' own credentials, if any."""
        host, port = node
        scheme = "rediss" if self.tls else "redis"
        login = ""
        if self.sentinel_password is not None:
            user = quote(self.sentinel_username or "", safe="")
            login = f"{user}:{quote(self.sentinel_password, safe='')}@"
        return f"{scheme}://{login}{host}:{port}"

    def redacted(self) -> str:
        """The address without its passwords, for logs, errors and the policy."""
        return redact(self.url)


def redact(url: str) -> str:
    """`url` with any password replaced by `***` (the query's too)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    location, qmark, query = rest.partition("?")
    head, slash, path = location.partition("/")
    if "@" in head:
        login, _, hosts = head.rpartition("@")
        user = login.partition(":")[0]
        head = f"{user}:***@{hosts}" if ":" in login else f"{user}@{hosts}"
    if query:
        parts = [
            f"{name}=***" if "password" in name.lower() else f"{name}={value}"
            for name, _, value in (p.partition("=") for p in query.split("&"))
        ]
        query = "&".join(parts)
    return f"{scheme}://{head}{slash}{path}{qmark}{query}"


def parse(url: str) -> RedisAddress:
    """Parse a `--redis-url`; ValueError (naming no password) when it is not one."""
    if url.startswith(SINGLE_SCHEMES):
        return RedisAddress("single", url, tls=url.startswith("rediss://"))
    if not url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        scheme = url.partition("://")[0][:20]  # never the rest: it may hold a password
        raise ValueError(
            f"--redis-url has scheme {scheme + '://'!r}; expected one of {', '.join(SCHEMES)}"
        )
    scheme, _, rest = url.partition("://")
    cluster = scheme.endswith("+cluster")
    split = urlsplit("x://" + rest)
    login, _, hosts = split.netloc.rpartition("@")
    username, password = _login(login)
    query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
    tls = scheme.startswith("rediss") or query.get("tls", "0").lower() in ("1", "true", "yes")
    nodes = tuple(
        _node(h, DEFAULT_PORT if cluster else DEFAULT_SENTINEL_PORT) for h in hosts.split(",")
    )
    path = [unquote(p) for p in split.path.split("/") if p]
    shown = redact(url)
    if cluster:
        if path:
            raise ValueError(f"a cluster address has no path (no database): {shown}")
        return RedisAddress("cluster", url, nodes, username, password, tls)
    if not path or len(path) > 2:
        raise ValueError(f"a Sentinel address ends in /MASTER-NAME or /MASTER-NAME/DB: {shown}")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database of a Sentinel address must be a number: {shown}")
    return RedisAddress(
        "sentinel",
        url,
        nodes,
        username,
        password,
        tls,
        master_name=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
    )


def _login(login: str) -> tuple[str | None, str | None]:
    if not login:
        return None, None
    user, colon, password = login.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _node(text: str, default_port: int) -> Node:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"a Redis address lists an empty host ({text!r})")
    if port and not port.isdigit():
        raise ValueError(f"a Redis address has a port that is not a number ({text!r})")
    number = int(port) if port else default_port
    if not 0 < number < 65536:
        raise ValueError(f"a Redis address has a port out of range ({text!r})")
    return host, number
