"""Entry point of the in-guest agent: ``python3 -m kvmsandbox.agent.guest``."""

from kvmsandbox.agent.guest.main import main

raise SystemExit(main())
