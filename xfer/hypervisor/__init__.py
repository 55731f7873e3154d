"""Hypervisor side: QEMU QMP pause-before-switchover hook, migration messages."""
