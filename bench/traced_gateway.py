"""`poolgate serve` with generation-2 GC pauses logged to stderr, for tail.py's attribution.

    python bench/traced_gateway.py serve --config FILE

Nothing in the gateway changes: the collector's callbacks are installed before the CLI starts.
"""

from __future__ import annotations

import sys

from bare_proxy import install_gc_log

if __name__ == "__main__":
    install_gc_log()
    from poolgate.cli.main import main

    sys.argv[0] = "poolgate"
    main()
