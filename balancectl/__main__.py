from __future__ import annotations

from balancectl.cli import main

if __name__ == "__main__":
    main()
