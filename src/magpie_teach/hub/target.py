"""Where Hub reads and writes go: ``HF_ENDPOINT`` if set, huggingface.co with a token, else the local hub.

huggingface_hub and datasets read ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` when they are imported,
so the choice is made by the CLI before either is imported (``choose_target``), and the environment
is what carries it, exactly as for a user who exports the variables themselves.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8765


@dataclass
class Target:
    endpoint: str
    local: bool
    root: str | None = None
    why: str = ""


def hub_root() -> Path:
    """The local hub's storage: $MAGPIE_TEACH_HUB_ROOT, default ~/.cache/magpie-teach/hub."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magpie-teach" / "hub"
    return Path(os.environ.get("MAGPIE_TEACH_HUB_ROOT") or default)


def _token_file() -> Path:
    if os.environ.get("HF_TOKEN_PATH"):
        return Path(os.environ["HF_TOKEN_PATH"])
    home = (
        os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home) / "token"


def has_token() -> bool:
    """Whether huggingface_hub would find a token (env or `hf auth login`), without importing it."""
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")) or _token_file().is_file()


def hub_token() -> str | None:
    """The token huggingface_hub would use; it is passed to the client and never printed or written."""
    from huggingface_hub import get_token

    return get_token()


def _probe(base_url: str, nonce: str = "") -> dict | None:
    query = f"?nonce={nonce}" if nonce else ""
    try:
        with urllib.request.urlopen(f"{base_url}/_local/stats{query}", timeout=2) as response:  # noqa: S310 - loopback
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def serves_root(base_url: str, root: str | Path) -> bool:
    """Whether the server at BASE_URL proves that it serves ROOT: it answers a fresh nonce with the HMAC of the
    root's secret, which only this user (and a server they started on ROOT) can read. A server that only says
    it serves ROOT (an impostor on the port) does not get the push."""
    import hmac
    import secrets

    from magpie_teach.hub.server import proof, root_secret

    nonce = secrets.token_hex(16)
    answer = _probe(base_url, nonce) or {}
    expected = proof(root_secret(root), nonce)
    return answer.get("root") == str(Path(root).resolve()) and hmac.compare_digest(str(answer.get("proof")), expected)


def start_local_hub(root: str | Path, port: int = DEFAULT_PORT) -> str:
    """Serves ROOT on 127.0.0.1 in a background thread of this process (or reuses a hub on PORT that proves it
    serves ROOT, see :func:`serves_root`); returns the base URL."""
    from magpie_teach.hub.server import LocalHubServer

    root = str(Path(root).resolve())
    existing = _probe(f"http://127.0.0.1:{port}")
    if existing and existing.get("root") == root:
        if serves_root(f"http://127.0.0.1:{port}", root):
            return f"http://127.0.0.1:{port}"
        print(f"warning: the server on 127.0.0.1:{port} says it serves {root} but cannot prove it (it does not "
              "know the root's secret): it is not used; serving the root on another port", file=sys.stderr)  # fmt: skip
    try:
        server = LocalHubServer(root, port=port)
    except OSError:  # the port is taken by something else: any free port will do
        server = LocalHubServer(root, port=0)
    threading.Thread(target=server.serve_forever, name="magpie-teach-local-hub", daemon=True).start()
    return server.base_url


def choose_target(announce: bool = True) -> Target:
    """Picks the Hub endpoint for this process and exports it. Call before huggingface_hub is imported."""
    if os.environ.get("HF_ENDPOINT"):
        return Target(os.environ["HF_ENDPOINT"], local=False, why="HF_ENDPOINT is set")
    if has_token():
        return Target("https://huggingface.co", local=False, why="a Hugging Face token was found")
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("choose_target() must run before huggingface_hub is imported (it reads HF_ENDPOINT then)")
    from magpie_teach.hub.server import root_secret

    root = hub_root()
    url = start_local_hub(root)
    os.environ["HF_ENDPOINT"] = url
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_TOKEN"] = root_secret(root)  # the write token of a hub that requires one; sent to it alone
    if announce:
        print(
            f"no Hugging Face token found: publishing to the local hub in {root} ({url}, which proved it serves "
            "that folder).\n"
            f"  read it back with: magpie-teach hub serve   (then export HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1)\n"
            "  publish to huggingface.co instead: set HF_TOKEN or run `hf auth login`",
            file=sys.stderr,
        )
    return Target(url, local=True, root=str(root), why="no token and no HF_ENDPOINT")
