"""The device agent: one daemon per device exports, imports, forgets, pushes and pulls
a VM's state on authenticated (mutual TLS) request, and — in the manager's multicast
group — deposits and collects it on its own (the device-driven variant).

    config.py   the configuration file
    tls.py      server and client SSL contexts (mutual TLS against one CA)
    journal.py  the import journal: an interrupted import is rolled back at restart
    service.py  the logic: validation, journal, push/pull (no HTTP here)
    server.py   the asyncio HTTP server, logs and metrics
    client.py   the client (CLI, push/pull, the manager)
    upstream.py the device-driven variant's requests to the manager
    devicedriven.py  the device-driven variant: act on migration messages heard on the group
"""
