"""The spending policy engine of a user device: pure decisions with reasons."""
