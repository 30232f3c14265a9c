"""The vendor device: CoAP payment resources, metering, durable sessions and settlement."""
