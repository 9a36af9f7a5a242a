"""The `poolgate` CLI with every generation-2 GC pause logged to stderr, for tail.py's attribution.

    python bench/traced_poolgate.py serve --config FILE
    python bench/traced_poolgate.py mock-upstream --port P --accept-any-key --unlimited

Nothing in poolgate changes: the collector's callback is installed before the CLI starts.
"""

from __future__ import annotations

import sys

from bare_proxy import install_gc_log

if __name__ == "__main__":
    install_gc_log()
    from poolgate.cli.main import main

    sys.argv[0] = "poolgate"
    main()
