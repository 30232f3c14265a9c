"""The user device: wallet, withdrawals, paying vendors under its policy."""
