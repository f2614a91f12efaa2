"""Ask a Cassandra node one CQL query over native protocol v3 (stdlib only).

    python3 scripts/cql_probe.py HOST PORT [QUERY]

Exit 0 when the node answers the query (default: its release version) with a
result; a query that returns rows prints how many. Used by scripts/cassandra.sh
(is CQL up?) and scripts/cassandra-cluster.sh (does every node see its peers?)
before any virtualenv or driver exists.
"""

from __future__ import annotations

import socket
import struct
import sys


def frame(op: int, body: bytes) -> bytes:
    return struct.pack(">BBhBi", 3, 0, 0, op, len(body)) + body


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def recv(s: socket.socket) -> tuple[int, bytes]:
    header = recv_exactly(s, 9)
    return header[4], recv_exactly(s, struct.unpack(">i", header[5:9])[0])


def string(x: str) -> bytes:
    data = x.encode()
    return struct.pack(">H", len(data)) + data


class Reader:
    def __init__(self, body: bytes) -> None:
        self.body, self.at = body, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.body, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def skip_string(self) -> None:
        n = self.take(">H")
        self.at += n

    def skip_bytes(self) -> None:
        n = self.take(">i")
        self.at += max(n, 0)

    def skip_type(self) -> None:
        kind = self.take(">H")
        if kind == 0x0000:  # custom: its class name
            self.skip_string()
        elif kind in (0x0020, 0x0022):  # list, set
            self.skip_type()
        elif kind == 0x0021:  # map
            self.skip_type()
            self.skip_type()


def rows_count(body: bytes) -> int | None:
    """The number of rows of a RESULT body, None when it is not a Rows result."""
    r = Reader(body)
    if r.take(">i") != 0x0002:
        return None
    flags, columns = r.take(">i"), r.take(">i")
    if flags & 0x0002:  # has_more_pages: the paging state
        r.skip_bytes()
    if not flags & 0x0004:  # column specs follow
        if flags & 0x0001:  # global table spec: keyspace and table once
            r.skip_string()
            r.skip_string()
        for _ in range(columns):
            if not flags & 0x0001:
                r.skip_string()
                r.skip_string()
            r.skip_string()  # the column's name
            r.skip_type()
    return r.take(">i")


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    query = (sys.argv[3] if len(sys.argv) > 3 else "SELECT release_version FROM system.local").encode()
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(frame(0x05, b""))  # OPTIONS
            if recv(s)[0] != 0x06:  # SUPPORTED
                return 1
            s.sendall(frame(0x01, struct.pack(">H", 1) + string("CQL_VERSION") + string("3.0.0")))  # STARTUP
            if recv(s)[0] != 0x02:  # READY
                return 1
            s.sendall(frame(0x07, struct.pack(">i", len(query)) + query + struct.pack(">HB", 1, 0)))  # QUERY, ONE
            op, body = recv(s)
    except (OSError, EOFError, struct.error):
        return 1
    if op != 0x08:  # RESULT
        return 1
    n = rows_count(body)
    if n is not None and len(sys.argv) > 3:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
