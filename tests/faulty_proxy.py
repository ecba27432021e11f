"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible server (vLLM's), for the tests.

Every request is forwarded to the real server unchanged, except chat completions whose last user
message is named in a rule: ``fail`` answers 500 every time, ``fail_once`` answers 500 the first
time and forwards the retry, ``empty`` forwards and blanks the completion's text. The faults are
the proxy's; the protocol, the client library and the model behind it are real.
"""

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultyProxy:
    def __init__(self, upstream: str, fail=(), fail_once=(), empty=(), slow=(), delay: float = 0.0):
        self.upstream = upstream.rstrip("/")  # http://127.0.0.1:PORT (no /v1)
        self.fail, self.fail_once, self.empty, self.slow = set(fail), set(fail_once), set(empty), set(slow)
        self.delay = delay
        self.attempts: Counter = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes | None) -> tuple[int, bytes, str]:
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        return (
                            response.status,
                            response.read(),
                            response.headers.get("Content-Type", "application/json"),
                        )
                except urllib.error.HTTPError as err:
                    return err.code, err.read(), "application/json"

            def do_GET(self):
                self._reply(*self._forward(None))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                prompt = None
                if self.path.endswith("/chat/completions"):
                    messages = json.loads(body).get("messages", [])
                    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
                    proxy.attempts[prompt] += 1
                if prompt in proxy.slow:
                    time.sleep(proxy.delay)
                if prompt in proxy.fail or (prompt in proxy.fail_once and proxy.attempts[prompt] == 1):
                    error = {"error": {"message": "injected fault", "type": "server_error", "code": 500}}
                    return self._reply(500, json.dumps(error).encode())
                status, payload, content_type = self._forward(body)
                if prompt in proxy.empty and status == 200:
                    reply = json.loads(payload)
                    for choice in reply["choices"]:
                        choice["message"]["content"] = ""
                    payload = json.dumps(reply).encode()
                self._reply(status, payload, content_type)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
