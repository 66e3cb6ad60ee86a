from __future__ import annotations

from balancectl.cli import main

main()
