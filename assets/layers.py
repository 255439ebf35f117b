"""`python -m assets.layers last|count`: the configured model's layer count, for shell scripts."""

from __future__ import annotations

import os
import sys

from pipeline.core.models import EMBEDDED, model_layer_count


def main(argv: list[str]) -> int:
    n = model_layer_count(os.environ.get("NEURON_ATLAS_MODEL") or EMBEDDED)
    what = argv[0] if argv else "count"
    if what not in ("last", "count"):
        print("usage: python -m assets.layers [last|count]", file=sys.stderr)
        return 2
    print(n - 1 if what == "last" else n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
