"""`pykata collect`: one report of this host's pykata for a bug report.

`report` gathers the sections (versions, `check`, `env`, the pods with
their consoles, logs and event logs, recent errors); `redact` takes out the
values of environment variables and annotations before anything is written.
"""
