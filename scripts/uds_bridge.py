"""Forward TCP <-> Unix socket, so a service inside a loopback-only network
namespace can be reached on the host's 127.0.0.1 (a Unix socket is a file, and
files cross network namespaces).

    uds_bridge.py tcp-to-unix HOST:PORT SOCKET [READY]  # host side: listen TCP, dial socket
    uds_bridge.py unix-to-tcp SOCKET HOST:PORT          # namespace side: listen socket, dial TCP

READY: a file created once the TCP port is bound (scripts/loopback-serve waits for
it). A port already in use is one line on stderr and exit 2.
"""

import asyncio
import contextlib
import os
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _handler(dial):
    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await dial()
        except OSError:
            w1.close()  # the service is not up yet: the client sees a closed connection
            return
        await asyncio.gather(_pipe(r1, w2), _pipe(r2, w1))

    return handle


async def main(mode: str, a: str, b: str, ready: str | None = None) -> None:
    if mode == "tcp-to-unix":
        host, port = a.rsplit(":", 1)
        try:
            server = await asyncio.start_server(
                _handler(lambda: asyncio.open_unix_connection(b)), host, int(port))
        except OSError as e:
            sys.exit(f"error: port {port} on {host} is in use ({e.strerror}); "
                     "choose another with IMAGEGEN_PORT / IMAGEGEN_GRPC_PORT (0: no gRPC) / "
                     "IMAGEGEN_METRICS_PORT")
        if ready:
            open(ready, "w").close()
    elif mode == "unix-to-tcp":
        host, port = b.rsplit(":", 1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(a)
        server = await asyncio.start_unix_server(
            _handler(lambda: asyncio.open_connection(host, int(port))), a)
    else:
        raise SystemExit(__doc__)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(*sys.argv[1:]))
