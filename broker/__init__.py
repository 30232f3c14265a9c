"""Mosquitto configuration, ACL and PKI generation, and a launcher for development and tests."""
