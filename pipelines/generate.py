"""Responses from several teachers, resumable: `python pipelines/generate.py CONFIG [--dry-run]`.

A thin file over the library (the same as `magpie-teach generate`); configs live in pipelines/configs/.
"""

import sys

from magpie_teach.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
