"""`python -m modelwatch` runs the command line."""

from modelwatch.cli import main

raise SystemExit(main())
