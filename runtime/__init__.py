"""What every Tandem process shares, importing no service: layered config,
structured logs, the gRPC server lifecycle (health, reflection, metrics,
graceful shutdown), channels to peers, systemd notify, and the shared value
types (sampling, finish reasons, the GPU catalog)."""

__version__ = "0.1.0"
