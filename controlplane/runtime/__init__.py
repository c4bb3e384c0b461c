"""What every Tandem process shares: layered config, structured logs, the
gRPC server lifecycle (health, reflection, metrics, graceful shutdown)."""
