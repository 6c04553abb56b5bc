"""A hostile agent: what a guest whose root replaced pykata's agent can send the host."""
