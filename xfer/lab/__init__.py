"""The network-namespace lab: builder (``hosts``), topology, traffic peers and the demo."""
