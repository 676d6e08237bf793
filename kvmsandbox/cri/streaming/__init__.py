"""The CRI streaming server (exec, attach, port-forward): framing (SPDY/3.1, WebSocket) kept apart
from the Kubernetes protocols carried on it."""
