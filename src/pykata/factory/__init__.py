"""Fast starts: VM templates (VMs restored from one booted and saved once)."""
