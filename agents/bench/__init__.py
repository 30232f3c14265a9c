"""``m2mpay bench``: m2mpay's speed beside the limits of its transports and crypto."""
