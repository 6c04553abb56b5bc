"""What the host and the guest agree on to find each other, defined once.

Imported by the runtime on the host and by the agent in the guest, so it
imports nothing.
"""

# The virtio-serial port the agent serves ttRPC on (hosts without vsock).
AGENT_PORT_NAME = "agent.channel.0"
# The vsock port the agent serves ttRPC on (hosts with /dev/vhost-vsock).
AGENT_VSOCK_PORT = 1024
# The virtio-serial port that hands the agent its VM's token at boot; a vsock
# connection is served only after it presents the token.
TOKEN_PORT_NAME = "pykata.token"
TOKEN_SIZE = 32
# The 9p mount tag of the sandbox's shared directory.
SHARED_FS_TAG = "kataShared"
# The agent's ttRPC services.
AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
# CRI annotations that group containers into pods: the host puts a pod's
# containers in one VM; the guest shares the sandbox container's namespaces.
CONTAINER_TYPE_KEY = "io.kubernetes.cri.container-type"
SANDBOX_ID_KEY = "io.kubernetes.cri.sandbox-id"
# A pod's control API, served by its owner on the pod's control socket.
CONTROL_SERVICE = "pykata.pod.v1.Pod"
# containerd's names for pykata's shim.
SHIM_NAME = "containerd-shim-pykata-v2"
RUNTIME_TYPE = "io.containerd.pykata.v2"
# The pseudo-container id of the debug console's processes (`pykata exec`) in
# the process calls; no container id can be it (ids start with a letter or
# digit).
DEBUG_CONSOLE_ID = "@console"
