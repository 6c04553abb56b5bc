"""pykata: an OCI container runtime that runs every pod inside its own lightweight VM.

This module stays import-free on purpose: the guest agent and the shim's `start`
path both import it, and every import here is paid on each container start.
"""

__version__ = "0.1.0"
