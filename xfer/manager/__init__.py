"""The migration manager: topology, migration messages, the four modes, journal (issue 6)."""
