"""Use cases between the wire protocol and the engine. No HTTP in here."""
