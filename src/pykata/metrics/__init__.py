"""`pykata monitor`: Prometheus metrics for every pod on the node.

discovery (which pods there are) -> scrape (each owner asked at once, each
within its own deadline) -> procfs (the host's view of QEMU and the owner)
-> collector (Prometheus families) -> server (the HTTP listener).
"""
