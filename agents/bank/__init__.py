"""The bank (the paper's F): storage, request handling, MQTT service and its commands."""
