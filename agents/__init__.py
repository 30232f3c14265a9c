"""asyncio agents of m2mpay: bank, vendor, user, policy engine and the CLI."""
