"""Pod networking: the host side of mirroring a pod's network namespace into its VM."""
