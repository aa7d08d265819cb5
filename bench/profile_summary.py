"""Where each profiled service spent its CPU, by library: `python -m bench.profile_summary DIR`.

Reads the `<service>-<pid>.prof` files that `bench.pipeline_load --profile DIR` leaves (cProfile in CPU
time) and sums each function's own time by the package it lives in: a site-packages distribution,
one of our modules, or the standard library. Import-time work (start-up) is left out. With the
`.counts.json` beside a profile: the database statements, HTTP requests and publishes it made.
"""

from __future__ import annotations

import argparse
import json
import pstats
import re
import sys
from collections import Counter
from pathlib import Path

_SITE = re.compile(r"site-packages/([^/]+)")
_OURS = re.compile(r"/(?:services/\w+|libs/common|libs/sandbox)/(\w+)/(\w+)\.py$")
_STDLIB = re.compile(r"/python3\.\d+/(\w+)")


def bucket(path: str, name: str) -> str:
    """The package a profiled function belongs to ("imports" for start-up work)."""
    if path.startswith("<frozen") or name in ("<built-in method builtins.compile>", "<module>"):
        return "imports"
    if found := _SITE.search(path):
        return found.group(1).split(".")[0]
    if found := _OURS.search(path):
        return f"{found.group(1)}.{found.group(2)}"
    if found := _STDLIB.search(path):
        return f"stdlib {found.group(1)}"
    if path == "~":
        return f"builtin {name.strip('<>')}"[:60]
    return path


def summary(profile: Path) -> tuple[float, Counter[str]]:
    by_bucket: Counter[str] = Counter()
    for (path, _line, name), (_cc, _nc, own, _cum, _callers) in pstats.Stats(str(profile)).stats.items():  # type: ignore[attr-defined]
        by_bucket[bucket(path, name)] += own
    by_bucket.pop("imports", None)
    return sum(by_bucket.values()), by_bucket


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_summary", description=__doc__.splitlines()[0]
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--orders", type=int, help="orders in the profiled load: figures per order too")
    args = parser.parse_args(argv)
    per = f" = {{:.1f}} per order (of {args.orders})" if args.orders else ""
    for profile in sorted(args.directory.rglob("*.prof")):
        total, by_bucket = summary(profile)
        scale = 1000 / args.orders if args.orders else 0
        print(
            f"{profile.relative_to(args.directory)}: {total:.1f} s CPU after start-up"
            + (f" = {total * scale:.1f} ms per order (under cProfile)" if args.orders else "")
        )
        for name, seconds in by_bucket.most_common(args.top):
            print(f"  {seconds / total:6.1%}  {seconds:7.2f} s  {name}")
        counts = profile.with_suffix(".counts.json")
        if counts.exists():
            for name, count in sorted(json.loads(counts.read_text()).items(), key=lambda item: -item[1]):
                print(f"  {count:7d}  {name}" + (per.format(count / args.orders) if args.orders else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
