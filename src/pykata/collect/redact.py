"""Taking secrets out of a bug report before it leaves the host.

A container's environment and its annotations often carry credentials
(tokens, passwords in `FOO_PASSWORD=...`). The report shows their names,
never their values. Three layers, because a value can surface in places
the report does not parse (an agent's debug log quoting a spec, a process
that prints its environment to the console):

- structured: an env list becomes `NAME=<redacted>`, an annotation map keeps
  its keys with `<redacted>` values;
- learned values: every env and annotation value of the specs read is
  replaced wherever it appears in the report's text (values shorter than
  `MIN_LEARNED` are left to the other layers: replacing "1" everywhere
  would destroy the report). Not learned: the values of the runtime's own
  annotations (`PUBLIC_ANNOTATIONS`: a CRI pod's sandbox id is one, and
  the report names pods by it) and the ids the report names (`keep`);
- shapes: any `NAME=value` word with an upper-case environment-style name,
  and any `name=value` or `--name=value` whose name says it holds a secret
  (password, token, key, secret, credential... in any case), becomes
  `name=<redacted>`, the value ending only at a blank (other lower-case keys
  are left: kernel parameters and logfmt fields are what a report is for).

A learned value is also hunted in the form the report shows guest text in
(`untrusted.guest_text`/`guest_line`: control characters escaped), since a
console or an agent's error quoting it is shown that way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pykata.untrusted import guest_line, guest_text

REDACTED = "<redacted>"
MIN_LEARNED = 4
# An environment-style assignment: an upper-case name (at a word's start)
# and its value up to the next blank or quote.
# Annotations the container manager sets for the runtime (ids, names, the
# container's type): shown redacted, but not hunted through the report.
PUBLIC_ANNOTATIONS = ("io.kubernetes.cri.", "io.kubernetes.cri-o.", "io.katacontainers.",
                      "org.opencontainers.image.", "nerdctl/")
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_.\-/])([A-Z][A-Z0-9_]*)=(\S+)")
# A name that says its value is a secret, as a word's start or an option.
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "cred", "auth", "session",
                 "cookie", "private", "signature")
_SECRET_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9_.\-/])(-{0,2}(?:[A-Za-z][A-Za-z0-9_.\-]*?)?(?:"
    + "|".join(_SECRET_WORDS) + r")[A-Za-z0-9_.\-]*)=(\S+)", re.IGNORECASE)


class Redactor:
    def __init__(self) -> None:
        self._values: set[str] = set()
        self._kept: set[str] = set()

    def learn_spec(self, spec: Mapping[str, Any]) -> None:
        """Remember the env and annotation values of an OCI spec (or process)."""
        process = spec.get("process") if "process" in spec else spec
        if isinstance(process, Mapping):
            self.learn_env(process.get("env") or [])
        annotations = spec.get("annotations")
        if isinstance(annotations, Mapping):
            self.learn(str(v) for k, v in annotations.items()
                       if not str(k).startswith(PUBLIC_ANNOTATIONS))

    def learn_env(self, env: Iterable[Any]) -> None:
        self.learn(str(e).partition("=")[2] for e in env if isinstance(e, str))

    def learn(self, values: Iterable[str]) -> None:
        for value in values:
            if len(value) >= MIN_LEARNED:
                # As given, and as the report shows guest text.
                self._values.update((value, guest_text(value, len(value)),
                                     guest_line(value, len(value))))

    def keep(self, values: Iterable[str]) -> None:
        """Never hunt these (the pod and container ids the report names)."""
        self._kept.update(values)

    def env(self, env: Iterable[Any]) -> list[str]:
        """`NAME=<redacted>` for each entry (a malformed one says so)."""
        return [f"{str(e).partition('=')[0]}={REDACTED}" if isinstance(e, str) and "=" in e
                else REDACTED for e in env]

    @staticmethod
    def annotations(annotations: Mapping[str, Any]) -> dict[str, str]:
        return {str(k): REDACTED for k in annotations}

    def text(self, text: str) -> str:
        """`text` with every learned value and every `NAME=value` taken out."""
        # Longest first: a value that contains another goes whole.
        for value in sorted(self._values - self._kept, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
        return _ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
