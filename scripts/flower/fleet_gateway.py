"""Fleet gateway: the one door to a SuperLink that hospitals get, with the operator's door shut.

    python scripts/flower/fleet_gateway.py --listen 0.0.0.0:9093 --superlink 127.0.0.1:9092 \\
        --certfile $W/certs/server.crt --keyfile $W/certs/server.key --ca $W/certs/ca.crt

Flower 1.42 serves three APIs on the SuperLink's one HTTP port: Fleet (what SuperNodes use),
Control (what the ``flwr`` CLI uses: start runs, register SuperNodes) and Runtime. The
open-source build has no operator authentication and no flag to put Control on another
address, so anyone who reaches that port with ``ca.crt`` (every hospital has it) can start a
run, which means shipping code that every hospital's SuperNode executes, or register a node
key of their own. Run the SuperLink on 127.0.0.1 of the server machine and this gateway on the
address the hospitals reach: it forwards ``POST /v1/fleet/<call>`` and ``GET /health`` to the
SuperLink and answers 403 to everything else. The operator runs ``flwr`` on the server machine
(or through an SSH tunnel) against 127.0.0.1.

Standard library only. TLS on both sides: hospitals see ``--certfile`` (the SuperLink's own
certificate works when it names the gateway's address); the SuperLink's certificate is
checked against ``--ca``. ``--insecure`` drops TLS on both sides (loopback tests only).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import re
import ssl
import sys
import threading

FLEET_CALL = re.compile(r"^/v1/fleet/[a-z][a-z-]{0,63}$")  # e.g. /v1/fleet/pull-messages
# headers that belong to one connection, not to the request: never forwarded
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "host", "content-length"}
MAX_BODY = 64 * 2**20  # Flower sends arrays in 5 MiB chunks; anything far larger is not Fleet


class Gateway(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen, upstream, upstream_tls: ssl.SSLContext | None):
        super().__init__(listen, Forward)
        self.upstream, self.upstream_tls = upstream, upstream_tls
        self.local = threading.local()  # one upstream connection per handler thread


class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SuperNode's HTTP client expects
    server: Gateway

    def do_POST(self) -> None:
        if not FLEET_CALL.match(self.path):
            return self._refuse(403, "only the Fleet API is served here")
        self._forward()

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._refuse(403, "only the Fleet API is served here")
        self._forward()

    def do_PUT(self) -> None:
        self._refuse(403, "only the Fleet API is served here")

    do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_PUT

    def _refuse(self, status: int, why: str) -> None:
        body = why.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if 0 <= length <= MAX_BODY else None

    def _forward(self) -> None:
        body = self._body()
        if body is None:
            self.close_connection = True
            return self._refuse(411, f"a Content-Length of at most {MAX_BODY} bytes is required")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
            conn = self._upstream(fresh=attempt == 2)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                if attempt == 2:
                    return self._refuse(502, "the SuperLink did not answer")
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _upstream(self, fresh: bool) -> http.client.HTTPConnection:
        local, (host, port) = self.server.local, self.server.upstream
        if fresh or getattr(local, "conn", None) is None:
            if self.server.upstream_tls is None:
                local.conn = http.client.HTTPConnection(host, port, timeout=120)
            else:
                local.conn = http.client.HTTPSConnection(host, port, timeout=120,
                                                         context=self.server.upstream_tls)
        return local.conn

    def log_message(self, fmt: str, *args) -> None:
        sys.stderr.write(f"fleet-gateway {self.client_address[0]} {fmt % args}\n")


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected host:port")
    return host, int(port)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=address, required=True, help="host:port the hospitals reach")
    ap.add_argument("--superlink", type=address, required=True, help="the SuperLink's host:port")
    ap.add_argument("--certfile", help="the gateway's TLS certificate (PEM)")
    ap.add_argument("--keyfile", help="its private key (PEM)")
    ap.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate")
    ap.add_argument("--insecure", action="store_true", help="no TLS on either side (loopback tests)")
    args = ap.parse_args(argv)
    if not args.insecure and not (args.certfile and args.keyfile and args.ca):
        ap.error("--certfile, --keyfile and --ca are required unless --insecure")
    upstream_tls = None if args.insecure else ssl.create_default_context(cafile=args.ca)
    gateway = Gateway(args.listen, args.superlink, upstream_tls)
    if not args.insecure:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.certfile, args.keyfile)
        # the handshake happens in the handler's thread: a slow client cannot stall accept()
        gateway.socket = tls.wrap_socket(gateway.socket, server_side=True,
                                         do_handshake_on_connect=False)
    print(f"fleet gateway on {args.listen[0]}:{args.listen[1]} -> SuperLink "
          f"{args.superlink[0]}:{args.superlink[1]} (Fleet API only)", flush=True)
    gateway.serve_forever()


if __name__ == "__main__":
    main()
