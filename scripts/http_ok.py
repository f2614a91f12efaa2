"""Exit 0 when GET URL answers 200 within two seconds (stdlib only): the health probe
of scripts/nats-cluster.sh and scripts/run-cluster.sh.

    python3 scripts/http_ok.py http://127.0.0.1:18222/healthz
"""

import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
