"""Putting pykata on a node: containerd's configuration."""
