"""`edgefed relay serve` and `edgefed relay token`: run the store-and-forward HTTP relay."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from edgefed.cli.output import stderr, stdout, user_errors

app = typer.Typer(help="The HTTP relay: stores and forwards adapters, never opens them.")


@app.command("token")
@user_errors
def token(
    path: Annotated[Path, typer.Argument(help="File to write the new token to (mode 0600).")],
) -> None:
    """Write a new random bearer token for a relay and its devices."""
    from edgefed.atomic import atomic_write_text
    from edgefed.errors import InputFileError
    from edgefed.sync.relay import new_token

    if path.exists():
        raise InputFileError(f"{path} exists", "choose another path; tokens are never overwritten")
    atomic_write_text(path, new_token() + "\n")
    os.chmod(path, 0o600)
    stdout.print(f"token written to {path}; give it to the relay (--token-file) and each device")


@app.command("serve")
@user_errors
def serve(
    root: Annotated[Path, typer.Option(help="Folder where the relay keeps the blobs.")],
    token_file: Annotated[
        Path, typer.Option(help="File holding the federation's bearer token (`relay token`).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
    max_bytes: Annotated[
        int, typer.Option(help="Largest request body accepted (413 above).", min=1)
    ] = 64 << 20,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate (PEM); with --ssl-keyfile, serve HTTPS.")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
) -> None:
    """Serve a federation store over HTTP until interrupted (uvicorn)."""
    import uvicorn

    from edgefed.errors import InputFileError
    from edgefed.sync.relay import create_app, read_token

    try:
        secret = read_token(token_file)
    except (OSError, ValueError) as exc:
        raise InputFileError(
            f"cannot use token file {token_file} ({exc})",
            "make one with `edgefed relay token FILE`",
        ) from exc
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise InputFileError("TLS needs both --ssl-certfile and --ssl-keyfile", "give both")
    # bound here, before the root is made, and handed to uvicorn: a busy port is one line and
    # leaves nothing behind (uvicorn alone logs, exits 3 and would find the root made)
    listener = _listen(host, port)
    root.mkdir(parents=True, exist_ok=True)
    config = uvicorn.Config(
        create_app(root, secret, max_bytes),
        host=host,
        port=port,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        log_level="info",
    )
    scheme = "https" if ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    if scheme == "http" and not _loopback(host):
        stderr.print(
            f"warning: plain HTTP on {shown}: the bearer token and every adapter cross the network "
            "readable by anyone on it; beyond a trusted network give --ssl-certfile and "
            "--ssl-keyfile (or put a TLS proxy in front)",
            markup=False,
            highlight=False,
        )
    stderr.print(
        f"relay serving {root} on {scheme}://{shown}:{port} (Ctrl-C stops it)",
        markup=False,
        highlight=False,
    )
    uvicorn.Server(config).run(sockets=[listener])


def _loopback(host: str) -> bool:
    """Whether only this machine can reach HOST (a name is taken as reachable, except
    localhost: what it resolves to elsewhere is not ours to know)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to HOST:PORT as uvicorn binds one; ConfigError when it cannot be."""
    from edgefed.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is in use", "stop the other server or pass --port"
            ) from exc
        raise ConfigError(
            f"cannot listen on {host} port {port} ({exc.strerror or exc})",
            "pass a --host this machine has (127.0.0.1, or 0.0.0.0 for every interface)",
        ) from exc
    return listener
