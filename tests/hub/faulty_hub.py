"""The local Hub server with test-only fault hooks: the shipped server's handler plus ``/_local/faults``.

``POST /_local/faults {"match": REGEX, "times": N, "status": S, "delay": SECONDS, "message": M}``: the next N
requests whose "METHOD /path" matches REGEX are held for SECONDS and/or answered with status S.
``DELETE /_local/faults`` clears the rules. Run as ``python -m tests.hub.faulty_hub --root R --port P --ready-file F``.
"""

from __future__ import annotations

import argparse
import re
import threading
import time

from magpie_teach.hub.server import Handler, HubError, serve

_RULES: list[dict] = []
_LOCK = threading.Lock()


def _take(method: str, path: str) -> dict | None:
    with _LOCK:
        for rule in _RULES:
            if rule["times"] > 0 and re.search(rule["match"], f"{method} {path}"):
                rule["times"] -= 1
                return rule
    return None


class FaultyHandler(Handler):
    def before_route(self, path: str) -> bool:
        if path.rstrip("/") == "/_local/faults":
            if self.command == "POST":
                rule = self._json()
                with _LOCK:
                    _RULES.append({"times": 1, **rule})
            elif self.command == "DELETE":
                with _LOCK:
                    _RULES.clear()
            self._send(200, {"ok": True})
            return True
        fault = _take(self.command, path)
        if fault:
            if fault.get("delay"):
                time.sleep(fault["delay"])
            if fault.get("status"):
                self._body()
                raise HubError(fault["status"], fault.get("message", "injected fault"))
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    serve(args.root, port=args.port, verbose=False, ready_file=args.ready_file, handler=FaultyHandler)


if __name__ == "__main__":
    main()
