"""``python -m vhostuser_rs`` runs the command-line tool."""

from .cli import main

raise SystemExit(main())
