"""The host helpers the runtime core stands on: system calls the standard
library lacks, path operations that never follow a guest's links, mounts,
descriptors relayed for the OCI command line, vsock, and what the host
supports (`probes`)."""
