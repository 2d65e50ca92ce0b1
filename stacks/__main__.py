"""The MAXIMUS stack program: the environment model in, every platform component out (see infra/)."""

import sys
from pathlib import Path

import pulumi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.program import main
from opskit.errors import OpsError

try:
    main()
except OpsError as exc:
    raise pulumi.RunError(f"error: {exc}") from None
