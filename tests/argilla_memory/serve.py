"""Starts the unmodified Argilla server with the in-memory search engine registered (test code).

Run with the server's own virtual environment:  python serve.py --host 127.0.0.1 --port 6900
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory_engine  # noqa: E402,F401 - registers ARGILLA_SEARCH_ENGINE=memory
import uvicorn  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run("argilla_server:app", host=args.host, port=args.port, access_log=False)
