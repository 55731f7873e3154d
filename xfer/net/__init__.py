"""What the daemons and their clients share on the network, below all of them.

    tls.py      mutual-TLS contexts and the TlsFiles of a daemon's configuration
    sockets.py  TCP listeners and UDP (unicast, multicast) sockets bound inside a namespace
    address.py  IP, port and HOST:PORT as configuration files and flags write them
    api.py      every HTTPS endpoint's error bodies and statuses, compressed bundle bodies
    message.py  the migration message, its modes and its JSON encoding
    notify.py   sending a message to the manager (HTTP POST or one datagram)
    http1.py    the minimal HTTP/1.1 framing notify.py and the lab's stand-in manager use
    log.py      the daemons' JSON log lines

The agent (``xfer.agent``), the manager (``xfer.manager``) and the hypervisor hook
(``xfer.hypervisor``) import from here; nothing here imports them. See docs/architecture.md.
"""

# Where ``xfer manager serve`` listens by default (its [listen] section, API path). Here
# rather than in notify.py: the CLI shows it in --help without importing asyncio and ssl.
DEFAULT_MANAGER_URL = "https://127.0.0.1:8700/v1/migrations"
