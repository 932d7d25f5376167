"""tunestack: placeholder, replaced by the command's dispatcher."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("tunestack: not yet", file=sys.stderr)
    return 2
