"""The device agent: one daemon per device exports, imports, forgets, pushes and pulls
a VM's state on authenticated (mutual TLS) request.

    config.py   the configuration file
    tls.py      server and client SSL contexts (mutual TLS against one CA)
    journal.py  the import journal: an interrupted import is rolled back at restart
    service.py  the logic: validation, journal, push/pull (no HTTP here)
    server.py   the asyncio HTTP server, logs and metrics
    client.py   the client (CLI, push/pull, the manager)
"""
