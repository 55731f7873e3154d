"""The ``rules`` kind: a VM's static filter rules (nftables, iptables-legacy) travel with it.

``model`` (shared selection, placement, strict JSON), ``nftrules``/``iptrules``
(pure logic per backend), ``nft``/``ipt`` (kernel-facing), ``transfer`` (the kind's
export/import/forget). See docs/rules.md.
"""
