"""What both services (the control plane and the engine) share, and neither may import from
the other: the gRPC edge (status mapping, options, TLS, binding), the interceptors that admit
callers, health and reflection probes, the metrics endpoint, structured logs, and the Arrow
helpers for inference-log tables."""
