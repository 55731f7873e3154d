"""eBPF datapath: bcc tc programs (``*.bpf.c`` package data), their loader and map wrappers."""
