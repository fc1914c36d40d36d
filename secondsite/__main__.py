"""`python -m secondsite` is the `secondsite` command."""

from secondsite.cli import main

raise SystemExit(main())
