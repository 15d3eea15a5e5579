"""Allow `python -m naiad`."""

from naiad.cli import main

raise SystemExit(main())
